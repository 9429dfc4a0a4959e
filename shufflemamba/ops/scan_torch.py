"""Selective scan in pure PyTorch, fast on CPU, exact to the sequential reference.

Why it is fast: the recurrence is the only part that must be sequential, so it is
reduced to one in-place ``addcmul_`` per time step on a contiguous (batch, N, dim)
slab; everything else (discretisation, the C contraction, every gradient) is done as
large vectorised ops or batched matmuls. The sequence is processed in chunks of a few
time steps so that a chunk's (T, batch, N, dim) working set stays in cache. The
backward pass recomputes each chunk from its saved starting state (as the CUDA kernel
does) instead of keeping every state alive: memory is O(length / T) states, not
O(length). Inference skips the saved states altogether. State is accumulated in
float32 whatever the input dtype (float64 stays float64, for gradcheck-grade tests).

Inputs are the logical (batch, L, K, E) tensors of :class:`~shufflemamba.ops.args.ScanArgs`,
all directions forward (the entry point gathers other orders first); results and gradients are
contiguous in those shapes. Internal layout: time-major, the state as (batch, K, N, E) with the
channel axis innermost, so that y_t = C_t @ H_t is a row-vector matmul (the fast case for CPU BLAS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scan_fused
from .args import ScanArgs


def chunk_len(batch: int, dim: int, d_state: int, length: int, chunk_elements: int) -> int:
    """Time steps per chunk: a chunk's (T, batch, N, dim) slab holds about ``chunk_elements``
    (``ScanSettings.chunk_elements``, tuned with ``scripts/benchmark.py scan --chunk-sweep``)."""
    return max(1, min(length, chunk_elements // max(1, batch * dim * d_state)))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The scan's state dtype: float32 for any input, float64 kept for gradcheck-grade tests."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) to float rounding, ~3x faster than F.softplus on CPU.

    max(x, 0) + log1p(exp(-|x|)), with log1p(y) = log(u) - (u - 1 - y) / u, u = 1 + y:
    torch's CPU log1p is not vectorised, log is; the second term corrects the rounding of u.
    """
    if x.is_cuda:
        return F.softplus(x)
    y = torch.exp(-x.abs())
    u = y + 1
    corr = (u - 1).sub_(y).div_(u)
    return torch.log(u).sub_(corr).add_(x.clamp(min=0))


def _time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A logical (b, L, ...) tensor -> contiguous time-major (L, b, ...) in ``dtype``."""
    return x.to(dtype).transpose(0, 1).contiguous()


def _token_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Time-major (L, b, ...) -> contiguous (b, L, ...) in ``dtype``: whole rows move, which on CPU is
    several times cheaper than an element-wise transpose to channel-first (docs/benchmarks.md)."""
    out = x.new_empty((x.shape[1], x.shape[0], *x.shape[2:]), dtype=dtype)
    out.transpose(0, 1).copy_(x)
    return out


def _discretise(dt: Tensor, dtu: Tensor, A: Tensor, Bm: Tensor, dA: Tensor, H: Tensor) -> None:
    """Fill dA = exp(dt A) and H = dt u B for one chunk, in preallocated buffers.

    dt, dtu: (T, b, K, E); A: (K, N, E); Bm: (T, b, K, N). Buffers: (T, b, K, N, E).
    """
    torch.mul(dt.unsqueeze(-2), A, out=dA)
    dA.exp_()
    torch.mul(dtu.unsqueeze(-2), Bm.unsqueeze(-1), out=H)


def _recur(dA: Tensor, H: Tensor, h0: Tensor | None) -> None:
    """In place: H[t] <- dA[t] * H[t-1] + H[t], with H[-1] = h0 (None: zero state)."""
    if h0 is not None:
        H[0].addcmul_(dA[0], h0)
    for t in range(1, H.shape[0]):
        H[t].addcmul_(dA[t], H[t - 1])


class _Prepared:
    """Inputs converted once to the scan's time-major compute layout (L, b, K, E)."""

    fused: bool

    def __init__(self, args: ScanArgs, chunk: int, fused: bool):
        self.batch, self.length, self.groups, self.dg = args.delta.shape
        self.dim = self.groups * self.dg
        self.d_state = args.d_state
        self.cd = cd = compute_dtype(args.u)
        self.ut = _time_major(args.u, cd)
        dt_pre = _time_major(args.delta, cd)
        if args.delta_bias is not None:
            dt_pre = dt_pre + args.delta_bias.to(cd)
        self.dt_pre = dt_pre
        self.fused = fused
        if fused and args.delta_softplus:  # softplus and dt * u in one compiled pass instead of ~8
            self.dt, self.dtu = scan_fused.prepare(dt_pre, self.ut)
        else:
            self.dt = softplus(dt_pre) if args.delta_softplus else dt_pre
            self.dtu = self.dt * self.ut
        self.Bt, self.Ct = _time_major(args.B, cd), _time_major(args.C, cd)
        self.A = args.A.to(cd).transpose(1, 2).contiguous()  # (K, N, E)
        self.T = chunk

    def buffer(self) -> Tensor:
        return self.ut.new_empty((self.T, self.batch, self.groups, self.d_state, self.dg))

    def chunks(self):
        for s in range(0, self.length, self.T):
            yield s, min(s + self.T, self.length)


def _scan_forward(p: _Prepared, keep_starts: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Returns y_ssm (L, b, K, E) without the D term, the last state (b, K, N, E), chunk starts."""
    if p.fused:
        return _scan_forward_fused(p, keep_starts)
    dA_buf, H_buf = p.buffer(), p.buffer()
    y = p.ut.new_empty((p.length, p.batch, p.groups, p.dg))
    h, starts = None, []
    for s, e in p.chunks():
        n = e - s
        dA, H = dA_buf[:n], H_buf[:n]
        _discretise(p.dt[s:e], p.dtu[s:e], p.A, p.Bt[s:e], dA, H)
        if keep_starts:
            starts.append(h)
        _recur(dA, H, h)
        torch.matmul(p.Ct[s:e].reshape(-1, 1, p.d_state), H.view(-1, p.d_state, p.dg), out=y[s:e].view(-1, 1, p.dg))
        h = H[n - 1].clone() if (keep_starts or e < p.length) else H[n - 1]
    if h is None:  # an empty sequence
        h = p.ut.new_zeros((p.batch, p.groups, p.d_state, p.dg))
    return y, h, starts


def _scan_forward_fused(p: _Prepared, keep_starts: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """:func:`_scan_forward` through the Inductor-compiled chunk (:mod:`.scan_fused`)."""
    y = p.ut.new_empty((p.length, p.batch, p.groups, p.dg))
    h, starts = p.ut.new_zeros((p.batch, p.groups, p.d_state, p.dg)), []
    for s, e in p.chunks():
        if keep_starts:
            starts.append(h if s else None)
        for a, b in scan_fused.pieces(s, e):
            y[a:b], h = scan_fused.forward(p.dt[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], h)
    return y, h, starts


def _states_tensor(p: _Prepared, starts: list[Tensor | None]) -> Tensor:
    """The chunks' starting states as one (chunks, b, K, N, E) tensor (chunk 0 starts at zero)."""
    zero = p.ut.new_zeros((p.batch, p.groups, p.d_state, p.dg))
    return torch.stack([zero if h is None else h for h in starts])


def num_chunks(length: int, chunk: int) -> int:
    """How many chunks the scan splits a sequence into (the leading size of its saved states)."""
    return -(-length // chunk)


def scan_forward(
    args: ScanArgs, chunk: int, fused: bool, for_backward: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(out (b, L, K, E) in u's dtype; the ungated output (L, b, K, E), with z, for backward; the
    chunk-start states (chunks, b, K, N, E), for backward; the last state (b, K, E, N)). Inputs may
    have any strides; token-major ones are the cheapest. Nothing is kept without ``for_backward``."""
    p = _Prepared(args, chunk, fused)
    y, last, starts = _scan_forward(p, keep_starts=for_backward)
    if args.D is not None:
        y.addcmul_(p.ut, args.D.to(p.cd))
    ungated = None
    if args.z is not None:
        gate = F.silu(_time_major(args.z, p.cd))
        if for_backward:
            ungated, y = y, y * gate
        else:
            y.mul_(gate)
    states = _states_tensor(p, starts) if for_backward else None
    return _token_major(y, args.u.dtype), ungated, states, last.transpose(-1, -2).contiguous()


def _backward_chunks(
    p: _Prepared, states: Tensor, gy: Tensor, g_dt: Tensor, g_dtu: Tensor, g_A: Tensor, g_Bt: Tensor, g_Ct: Tensor
) -> None:
    """The eager chunk loop of :func:`scan_backward`: fills the gradient buffers in place."""
    N, dg = p.d_state, p.dg
    dA_buf, H_buf, G_buf = p.buffer(), p.buffer(), p.buffer()
    carry = None
    spans = list(p.chunks())
    for ci in range(len(spans) - 1, -1, -1):
        s, e = spans[ci]
        n = e - s
        dA, H, G = dA_buf[:n], H_buf[:n], G_buf[:n]
        h0 = states[ci]
        _discretise(p.dt[s:e], p.dtu[s:e], p.A, p.Bt[s:e], dA, H)
        _recur(dA, H, h0)
        Hm = H.view(-1, N, dg)
        # dL/dC_t = H_t @ gy_t
        # (row vector @ transposed view: the fast BLAS case, unlike a matrix @ column vector)
        torch.matmul(gy[s:e].reshape(-1, 1, dg), Hm.transpose(1, 2), out=g_Ct[s:e].view(-1, 1, N))
        # dL/dh_t from the output, then the reverse recurrence (in place in G)
        torch.mul(p.Ct[s:e].unsqueeze(-1), gy[s:e].unsqueeze(-2), out=G)
        if carry is not None:
            G[n - 1].add_(carry)
        for t in range(n - 2, -1, -1):
            G[t].addcmul_(dA[t + 1], G[t + 1])
        carry = dA[0] * G[0]
        Gm = G.view(-1, N, dg)
        # dL/d(dt u)_t = B_t @ G_t ;  dL/dB_t = G_t @ (dt u)_t
        torch.matmul(p.Bt[s:e].reshape(-1, 1, N), Gm, out=g_dtu[s:e].view(-1, 1, dg))
        torch.matmul(p.dtu[s:e].reshape(-1, 1, dg), Gm.transpose(1, 2), out=g_Bt[s:e].view(-1, 1, N))
        # W = dL/d(dt A) = G * h_{t-1} * dA, built in the dA buffer (h_{-1} = the chunk's start)
        dA.mul_(G)
        dA[0].mul_(h0)
        if n > 1:
            dA[1:].mul_(H[: n - 1])
        g_A.add_(torch.mul(dA, p.dt[s:e].unsqueeze(-2)).sum((0, 1)))
        torch.mul(dA, p.A, out=G)
        torch.sum(G, -2, out=g_dt[s:e])


def _backward_fused(
    p: _Prepared, states: Tensor, gy: Tensor, g_dt: Tensor, g_dtu: Tensor, g_A: Tensor, g_Bt: Tensor, g_Ct: Tensor
) -> None:
    """:func:`_backward_chunks` through the Inductor-compiled pieces (:mod:`.scan_fused`)."""
    carry = torch.zeros_like(states[0])
    for ci, (s, e) in reversed(list(enumerate(p.chunks()))):
        pieces = scan_fused.pieces(s, e)
        piece_starts = [states[ci]]  # each piece's starting state, recomputed from the chunk's
        for a, b in pieces[:-1]:
            piece_starts.append(
                scan_fused.forward(p.dt[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], piece_starts[-1])[1]
            )
        for (a, b), h0 in reversed(list(zip(pieces, piece_starts, strict=True))):
            g_dtu[a:b], g_Bt[a:b], g_Ct[a:b], g_A_piece, g_dt[a:b], carry = scan_fused.backward(
                p.dt[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], h0, gy[a:b], carry
            )
            g_A.add_(g_A_piece)


def scan_backward(
    g_out: Tensor, args: ScanArgs, ungated: Tensor | None, states: Tensor, chunk: int, fused: bool
) -> tuple[Tensor | None, ...]:
    """Gradients (u, delta, A, B, C, D, z, delta_bias) of :func:`scan_forward`, each in its input's
    dtype and logical shape, contiguous (None for absent inputs). Recomputes each chunk's states
    from ``states``."""
    p = _Prepared(args, chunk, fused)
    cd = p.cd
    g_yt = _time_major(g_out, cd)  # (L, b, K, E)
    g_z = None
    if args.z is not None:
        zt = _time_major(args.z, cd)
        sig = torch.sigmoid(zt)
        g_z = _token_major(g_yt * ungated * sig * (1 + zt * (1 - sig)), args.z.dtype)
        g_yt = g_yt * (zt * sig)
    g_D = None
    g_ut = torch.zeros_like(p.ut)
    if args.D is not None:
        g_D = (g_yt * p.ut).sum((0, 1)).to(args.D.dtype)
        g_ut.addcmul_(g_yt, args.D.to(cd))

    g_dt = torch.empty_like(p.dt)
    g_dtu = torch.empty_like(p.dt)
    g_A = torch.zeros_like(p.A)
    g_Bt = torch.empty_like(p.Bt)
    g_Ct = torch.empty_like(p.Ct)
    backward = _backward_fused if p.fused else _backward_chunks
    backward(p, states, g_yt, g_dt, g_dtu, g_A, g_Bt, g_Ct)
    g_dt.addcmul_(g_dtu, p.ut)
    g_ut.addcmul_(g_dtu, p.dt)
    if args.delta_softplus:
        g_dt.mul_(torch.sigmoid(p.dt_pre))
    g_delta_bias = g_dt.sum((0, 1)).to(args.delta_bias.dtype) if args.delta_bias is not None else None
    return (
        _token_major(g_ut, args.u.dtype),
        _token_major(g_dt, args.delta.dtype),
        g_A.transpose(1, 2).to(args.A.dtype).contiguous(),
        _token_major(g_Bt, args.B.dtype),
        _token_major(g_Ct, args.C.dtype),
        g_D,
        g_z,
        g_delta_bias,
    )
