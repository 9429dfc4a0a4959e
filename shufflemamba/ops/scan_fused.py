"""One chunk of the torch scan (discretise, recur, contract) as a single loop compiled by Inductor.

The eager chunk writes the (T, b, G, N, dg) tensors exp(dt A) and the states to memory and reads
them back in four more passes (recurrence, C contraction; in the backward the reverse recurrence
and three contractions); compiled, each time step's exp, update and contraction stay in
registers, which is what the CPU is short of (docs/benchmarks.md: ``exp`` and element-wise passes
over (L, b, 2E, N) dominate the eager scan).

Compiled once per piece shape (a chunk is cut into pieces of at most ``MAX_PIECE_STEPS`` steps) and
cached (Inductor's on-disk cache, ``TORCHINDUCTOR_CACHE_DIR``, serves later processes). Used for
large scans with a real state only (``ScanSettings.fused``, default ``$SHUFFLEMAMBA_SCAN_FUSED``:
``auto`` from 4M state elements per call and d_state >= 8, ``1`` always, ``0`` never), so small
shapes never pay a compile; if compiling fails (no C++ compiler), the eager chunk is used from
then on, with one warning.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import Tensor

log = logging.getLogger(__name__)

AUTO_MIN_ELEMENTS = 1 << 22  # b x dim x N x L per scan call: Vim-T at batch 8 is 19M, the demo 2M
AUTO_MIN_STATE = 8  # Vim's d_state 16 is where exp and the state passes dominate; VMamba's 1 is not
MAX_PIECE_STEPS = 16  # the compiled loop is unrolled: its compile time grows with the steps
_state = {"broken": False}


def enabled(mode: str, batch: int, dim: int, d_state: int, length: int, device: torch.device) -> bool:
    """Whether a scan call in ``mode`` (auto | 0 | 1) goes through the compiled chunks (CPU only; see
    module doc)."""
    if mode == "0" or _state["broken"] or device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return mode == "1" or (d_state >= AUTO_MIN_STATE and batch * dim * d_state * length >= AUTO_MIN_ELEMENTS)


def pieces(start: int, end: int) -> list[tuple[int, int]]:
    """Split the chunk [start, end) into equal pieces of at most ``MAX_PIECE_STEPS`` steps, each one
    compiled call: compile time stays bounded whatever the chunk length (which grows as the batch,
    width or d_state shrink), and equal pieces keep the number of compiled shapes small."""
    count = -(-(end - start) // MAX_PIECE_STEPS)
    size = -(-(end - start) // count)
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def chunk_forward(dt: Tensor, dtu: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """T steps from state h: y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t.

    dt, dtu: (T, b, K, E); A: (K, N, E); Bm, Cm: (T, b, K, N); h: (b, K, N, E) ->
    ys (T, b, K, E), the last state."""
    ys = []
    for t in range(dt.shape[0]):
        h = torch.exp(dt[t].unsqueeze(-2) * A) * h + dtu[t].unsqueeze(-2) * Bm[t].unsqueeze(-1)
        ys.append((h * Cm[t].unsqueeze(-1)).sum(-2))
    return torch.stack(ys), h


def chunk_backward(
    dt: Tensor, dtu: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h0: Tensor, gy: Tensor, carry: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`chunk_forward` given dL/dy (gy) and dL/dh_last from the later chunks
    (carry): (g_dtu, g_B, g_C, g_A summed over the chunk and batch, g_dt through exp(dt A) only,
    dL/dh0 = the carry for the chunk before)."""
    steps = dt.shape[0]
    decays, states, h = [], [], h0
    for t in range(steps):
        decay = torch.exp(dt[t].unsqueeze(-2) * A)
        h = decay * h + dtu[t].unsqueeze(-2) * Bm[t].unsqueeze(-1)
        decays.append(decay)
        states.append(h)
    g_dtu, g_B, g_C, g_dt = [], [], [], []
    g_A = torch.zeros_like(A)
    grad_h = carry
    for t in range(steps - 1, -1, -1):
        grad_h = Cm[t].unsqueeze(-1) * gy[t].unsqueeze(-2) + grad_h
        g_C.append((gy[t].unsqueeze(-2) * states[t]).sum(-1))
        g_dtu.append((Bm[t].unsqueeze(-1) * grad_h).sum(-2))
        g_B.append((dtu[t].unsqueeze(-2) * grad_h).sum(-1))
        w = grad_h * (states[t - 1] if t > 0 else h0) * decays[t]
        g_A = g_A + (w * dt[t].unsqueeze(-2)).sum(0)
        g_dt.append((w * A).sum(-2))
        grad_h = decays[t] * grad_h
    flip = list(range(steps - 1, -1, -1))
    return (
        torch.stack([g_dtu[i] for i in flip]),
        torch.stack([g_B[i] for i in flip]),
        torch.stack([g_C[i] for i in flip]),
        g_A,
        torch.stack([g_dt[i] for i in flip]),
        grad_h,
    )


def prepare_softplus(dt_pre: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """dt = softplus(dt_pre) and dt * u, fused into one pass over the (L, b, dim) inputs."""
    dt = torch.nn.functional.softplus(dt_pre)
    return dt, dt * u


_compiled: dict[tuple, object] = {}


def _run(fn, *args: Tensor):
    """``fn`` compiled by Inductor for these shapes (once), or eager if compiling fails.

    Each shape gets its own copy of the function's code object, so Dynamo's per-code recompile
    limit never sends a model with many layer shapes (VMamba's stages) back to eager."""
    key = (fn.__name__, *(tuple(a.shape) for a in args), args[0].dtype)
    if key not in _compiled:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
        _compiled[key] = torch.compile(copy, dynamic=False)
    try:
        return _compiled[key](*args)
    except Exception as exc:  # no C++ compiler, an Inductor failure: the eager chunk is exact too
        if not _state["broken"]:
            log.warning("compiled scan chunks unavailable (%s: %s); using the eager scan", type(exc).__name__, exc)
        _state["broken"] = True
        return fn(*args)


def prepare(*args: Tensor) -> tuple[Tensor, Tensor]:
    return _run(prepare_softplus, *args)


def forward(*args: Tensor) -> tuple[Tensor, Tensor]:
    return _run(chunk_forward, *args)


def backward(*args: Tensor) -> tuple[Tensor, ...]:
    return _run(chunk_backward, *args)
