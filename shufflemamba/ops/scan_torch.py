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

Internal layout: time-major, the state as (batch, G, N, dim // G) with the channel axis
innermost, so that y_t = C_t @ H_t is a row-vector matmul (the fast case for CPU BLAS).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scan_fused

# Elements of one chunk's (T, batch, N, dim) slab; tuned with scripts/benchmark_scan.py.
_CHUNK_ELEMENTS = int(os.environ.get("SHUFFLEMAMBA_SCAN_CHUNK_ELEMENTS", 1 << 20))


def _chunk_len(batch: int, dim: int, d_state: int, length: int) -> int:
    return max(1, min(length, _CHUNK_ELEMENTS // max(1, batch * dim * d_state)))


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
    """(b, d, L) -> contiguous (L, b, d) in the compute dtype."""
    return x.to(dtype).permute(2, 0, 1).contiguous()


def token_major_empty(like: Tensor, shape: tuple[int, int, int], dtype: torch.dtype | None = None) -> Tensor:
    """An empty (b, d, L) tensor stored token-major, as (b, L, d): the layout of every (b, d, L)
    result and gradient of this scan (see :func:`_token_major`)."""
    batch, dim, length = shape
    return like.new_empty((batch, length, dim), dtype=dtype or like.dtype).transpose(1, 2)


def _token_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Time-major (L, b, d) -> a (b, d, L) tensor stored token-major (b, L, d), in ``dtype``.

    Token-major is what the mixer's linear layers produce and read, and it is reached from the
    scan's time-major layout by moving whole rows of d values; (b, d, L)-contiguous would be an
    element-wise transpose, which on CPU costs several times the copy (docs/benchmarks.md)."""
    length, batch, dim = x.shape
    out = token_major_empty(x, (batch, dim, length), dtype)
    out.transpose(1, 2).copy_(x.transpose(0, 1))
    return out


def bc_grad_empty(like: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """An empty gradient for B or C of ``shape`` (b, N, L) or (b, G, N, L), stored (b, L, [G,] N)."""
    if len(shape) == 3:
        return token_major_empty(like, shape, dtype)
    batch, groups, d_state, length = shape
    return like.new_empty((batch, length, groups, d_state), dtype=dtype or like.dtype).permute(0, 2, 3, 1)


def _bc_time_major(mat: Tensor, dtype: torch.dtype) -> Tensor:
    """B or C, (b, N, L) or (b, G, N, L) -> contiguous (L, b, G, N) in the compute dtype."""
    if mat.dim() == 3:
        mat = mat.unsqueeze(1)
    return mat.to(dtype).permute(3, 0, 1, 2).contiguous()


def _discretise(dt: Tensor, dtu: Tensor, A: Tensor, Bm: Tensor, dA: Tensor, H: Tensor) -> None:
    """Fill dA = exp(dt A) and H = dt u B for one chunk, in preallocated buffers.

    dt, dtu: (T, b, G, dg); A: (G, N, dg); Bm: (T, b, G, N). Buffers: (T, b, G, N, dg).
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
    """Inputs converted once to the scan's time-major compute layout."""

    fused: bool

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        self.batch, self.dim, self.length = u.shape
        self.d_state = A.shape[1]
        self.cd = cd = compute_dtype(u)
        self.ut = _time_major(u, cd)
        dt_pre = _time_major(delta, cd)
        if delta_bias is not None:
            dt_pre = dt_pre + delta_bias.to(cd)
        self.dt_pre = dt_pre
        self.fused = scan_fused.enabled(self.batch, self.dim, self.d_state, self.length, u.device)
        if self.fused and delta_softplus:  # softplus and dt * u in one compiled pass instead of ~8
            self.dt, dtu = scan_fused.prepare(dt_pre, self.ut)
        else:
            self.dt = softplus(dt_pre) if delta_softplus else dt_pre
            dtu = None
        self.Bt, self.Ct = _bc_time_major(B, cd), _bc_time_major(C, cd)
        self.groups = groups = self.Bt.shape[2]
        self.dg = dg = self.dim // groups
        self.A = A.to(cd).view(groups, dg, self.d_state).transpose(1, 2).contiguous()  # (G, N, dg)
        shape4 = (self.length, self.batch, groups, dg)
        self.dt4, self.ut4 = self.dt.view(shape4), self.ut.view(shape4)
        self.dtu = self.dt4 * self.ut4 if dtu is None else dtu.view(shape4)
        self.T = _chunk_len(self.batch, self.dim, self.d_state, self.length)

    def buffer(self) -> Tensor:
        return self.ut.new_empty((self.T, self.batch, self.groups, self.d_state, self.dg))

    def chunks(self):
        for s in range(0, self.length, self.T):
            yield s, min(s + self.T, self.length)


def _scan_forward(p: _Prepared, keep_starts: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Returns y_ssm (L, b, dim) without the D term, the last state (b, G, N, dg), chunk starts."""
    if p.fused:
        return _scan_forward_fused(p, keep_starts)
    dA_buf, H_buf = p.buffer(), p.buffer()
    y = p.ut.new_empty((p.length, p.batch, p.groups, p.dg))
    h, starts = None, []
    for s, e in p.chunks():
        n = e - s
        dA, H = dA_buf[:n], H_buf[:n]
        _discretise(p.dt4[s:e], p.dtu[s:e], p.A, p.Bt[s:e], dA, H)
        if keep_starts:
            starts.append(h)
        _recur(dA, H, h)
        torch.matmul(p.Ct[s:e].reshape(-1, 1, p.d_state), H.view(-1, p.d_state, p.dg), out=y[s:e].view(-1, 1, p.dg))
        h = H[n - 1].clone() if (keep_starts or e < p.length) else H[n - 1]
    return y.view(p.length, p.batch, p.dim), h, starts


def _scan_forward_fused(p: _Prepared, keep_starts: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """:func:`_scan_forward` through the Inductor-compiled chunk (:mod:`.scan_fused`)."""
    y = p.ut.new_empty((p.length, p.batch, p.groups, p.dg))
    h, starts = p.ut.new_zeros((p.batch, p.groups, p.d_state, p.dg)), []
    for s, e in p.chunks():
        if keep_starts:
            starts.append(h if s else None)
        for a, b in scan_fused.pieces(s, e):
            y[a:b], h = scan_fused.forward(p.dt4[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], h)
    return y.view(p.length, p.batch, p.dim), h, starts


def _states_tensor(p: _Prepared, starts: list[Tensor | None]) -> Tensor:
    """The chunks' starting states as one (chunks, b, G, N, dg) tensor (chunk 0 starts at zero)."""
    zero = p.ut.new_zeros((p.batch, p.groups, p.d_state, p.dg))
    return torch.stack([zero if h is None else h for h in starts])


def num_chunks(batch: int, dim: int, d_state: int, length: int) -> int:
    """How many chunks the scan splits a sequence into (the leading size of its saved states)."""
    return -(-length // _chunk_len(batch, dim, d_state, length))


def scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    for_backward: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(out (b, d, L) in u's dtype, stored token-major; the ungated output (L, b, d), with z, for
    backward; the chunk-start states (for backward); the last state (b, d, N)). Inputs may have
    any strides; token-major ones are the cheapest. Nothing is kept without ``for_backward``."""
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last, starts = _scan_forward(p, keep_starts=for_backward)
    if D is not None:
        y.addcmul_(p.ut, D.to(p.cd))
    ungated = None
    if z is not None:
        gate = F.silu(_time_major(z, p.cd))
        if for_backward:
            ungated, y = y, y * gate
        else:
            y.mul_(gate)
    states = _states_tensor(p, starts) if for_backward else None
    return _token_major(y, u.dtype), ungated, states, last.transpose(-1, -2).reshape(p.batch, p.dim, p.d_state)


def _backward_chunks(
    p: _Prepared, states: Tensor, gy4: Tensor, g_dt: Tensor, g_dtu: Tensor, g_A: Tensor, g_Bt: Tensor, g_Ct: Tensor
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
        _discretise(p.dt4[s:e], p.dtu[s:e], p.A, p.Bt[s:e], dA, H)
        _recur(dA, H, h0)
        Hm = H.view(-1, N, dg)
        # dL/dC_t = H_t @ gy_t
        # (row vector @ transposed view: the fast BLAS case, unlike a matrix @ column vector)
        torch.matmul(gy4[s:e].reshape(-1, 1, dg), Hm.transpose(1, 2), out=g_Ct[s:e].view(-1, 1, N))
        # dL/dh_t from the output, then the reverse recurrence (in place in G)
        torch.mul(p.Ct[s:e].unsqueeze(-1), gy4[s:e].unsqueeze(-2), out=G)
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
        g_A.add_(torch.mul(dA, p.dt4[s:e].unsqueeze(-2)).sum((0, 1)))
        torch.mul(dA, p.A, out=G)
        torch.sum(G, -2, out=g_dt[s:e])


def scan_backward(
    g_out: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    ungated: Tensor | None,
    states: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor | None, ...]:
    """Gradients (u, delta, A, B, C, D, z, delta_bias) of :func:`scan_forward`, each in its input's
    dtype (None for absent inputs); those of u, delta, z, B, C stored token-major. Recomputes each
    chunk's states from ``states``."""
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    cd, N = p.cd, p.d_state
    g_yt = _time_major(g_out, cd)  # (L, b, dim)
    g_z = None
    if z is not None:
        zt = _time_major(z, cd)
        sig = torch.sigmoid(zt)
        g_z = _token_major(g_yt * ungated * sig * (1 + zt * (1 - sig)), z.dtype)
        g_yt = g_yt * (zt * sig)
    g_D = None
    g_ut = torch.zeros_like(p.ut)
    if D is not None:
        g_D = (g_yt * p.ut).sum((0, 1)).to(D.dtype)
        g_ut.addcmul_(g_yt, D.to(cd))
    gy4 = g_yt.view(p.dt4.shape)

    g_dt = torch.empty_like(p.dt4)
    g_dtu = torch.empty_like(p.dt4)
    g_A = torch.zeros_like(p.A)
    g_Bt = torch.empty_like(p.Bt)
    g_Ct = torch.empty_like(p.Ct)
    if p.fused:
        carry = torch.zeros_like(states[0])
        for ci, (s, e) in reversed(list(enumerate(p.chunks()))):
            pieces = scan_fused.pieces(s, e)
            piece_starts = [states[ci]]  # each piece's starting state, recomputed from the chunk's
            for a, b in pieces[:-1]:
                piece_starts.append(
                    scan_fused.forward(p.dt4[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], piece_starts[-1])[1]
                )
            for (a, b), h0 in reversed(list(zip(pieces, piece_starts, strict=True))):
                g_dtu[a:b], g_Bt[a:b], g_Ct[a:b], g_A_piece, g_dt[a:b], carry = scan_fused.backward(
                    p.dt4[a:b], p.dtu[a:b], p.A, p.Bt[a:b], p.Ct[a:b], h0, gy4[a:b], carry
                )
                g_A.add_(g_A_piece)
    else:
        _backward_chunks(p, states, gy4, g_dt, g_dtu, g_A, g_Bt, g_Ct)
    g_dt.addcmul_(g_dtu, p.ut4)
    g_ut.view(p.dt4.shape).addcmul_(g_dtu, p.dt4)
    if delta_softplus:
        g_dt.mul_(torch.sigmoid(p.dt_pre.view(p.dt4.shape)))
    g_dt = g_dt.view(p.length, p.batch, p.dim)
    g_delta_bias = g_dt.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    return (
        _token_major(g_ut, u.dtype),
        _token_major(g_dt, delta.dtype),
        g_A.transpose(1, 2).reshape(p.dim, N).to(A.dtype).contiguous(),
        _bc_grad(g_Bt, B),
        _bc_grad(g_Ct, C),
        g_D,
        g_z,
        g_delta_bias,
    )


def _bc_grad(g_t: Tensor, mat: Tensor) -> Tensor:
    """A time-major (L, b, G, N) gradient back to B's / C's shape, stored as :func:`bc_grad_empty`."""
    out = bc_grad_empty(g_t, tuple(mat.shape), mat.dtype)
    stored = out.permute(0, 3, 1, 2) if mat.dim() == 4 else out.transpose(1, 2).unsqueeze(2)
    stored.copy_(g_t.transpose(0, 1))
    return out
