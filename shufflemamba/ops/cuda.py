"""The ``cuda`` backend: mamba-ssm's selective-scan kernels and causal-conv1d's conv.

Neither package imports on a machine without their compiled extensions (mamba-ssm imports
``selective_scan_cuda`` and transformers at import time), so nothing here is imported before a
CUDA tensor asks for it, and a failed import is turned into one actionable message instead of an
ImportError traceback. The scan is the ``shufflemamba::selective_scan_cuda`` custom op (mamba-ssm's
kernels called exactly as its ``SelectiveScanFn`` calls them), so torch.compile sees one opaque
op; causal-conv1d >= 1.4 registers its own custom ops and is called as it is.

The kernels read channel-first (batch, K * E, L) tensors with grouped B / C (batch, K, N, L):
:func:`scan_cuda_op` reshapes :class:`~shufflemamba.ops.args.ScanArgs`'s logical tensors to that,
which costs nothing when they are channel-first in memory (the Vim and VMamba mixers lay them out
so on this backend).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .args import GRADIENTS_SCHEMA, SCAN_SCHEMA, ScanArgs

INSTALL_HINT = (
    "install the CUDA extras on a GPU machine with `pip install -e '.[cuda]'`, or offline with "
    "`bash scripts/build_cuda_ext.sh DIR_WITH_SDISTS` (see README, 'GPU install'), or use "
    "model.scan_backend=triton, which needs no build"
)
_CHUNK = 2048  # mamba-ssm's kernel saves one state per 2048 steps

__all__ = ["CudaKernelsUnavailable", "causal_conv1d_cuda", "cuda_kernels_available", "require_cuda_kernels",
           "scan_cuda_op"]  # fmt: skip


class CudaKernelsUnavailable(RuntimeError):
    """The cuda scan backend was asked for but cannot run here."""


_LOADED: list[tuple[Callable | None, Callable | None, str | None]] = []  # filled once, then read


def _load() -> tuple[Callable | None, Callable | None, str | None]:
    """Import the kernel packages once. A plain module-level memo (not functools.cache), so that
    torch.compile, tracing a model after a first eager call, reads the result as a constant."""
    if _LOADED:
        return _LOADED[0]
    problems = []
    scan = conv = None
    try:
        import mamba_ssm  # noqa: F401  (its Python package must import too)
        import selective_scan_cuda as scan  # the extension mamba-ssm builds
    except Exception as exc:  # compiled extension missing, ABI mismatch, transformers missing...
        scan = None
        problems.append(f"mamba_ssm ({type(exc).__name__}: {exc})")
    try:
        from causal_conv1d import causal_conv1d_fn as conv
    except Exception as exc:
        problems.append(f"causal_conv1d ({type(exc).__name__}: {exc})")
    _LOADED.append((scan, conv, "; ".join(problems) or None))
    return _LOADED[0]


def cuda_kernels_available() -> bool:
    """True when a GPU is visible and both kernel packages import."""
    if not torch.cuda.is_available():
        return False
    scan, conv, _ = _load()
    return scan is not None and conv is not None


def require_cuda_kernels(device: torch.device | None = None) -> tuple:
    """(the selective_scan_cuda extension, causal_conv1d_fn), or a message naming what is missing."""
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable(f"scan backend 'cuda' needs a CUDA GPU, but torch sees none; {INSTALL_HINT}")
    if device is not None and device.type != "cuda":
        raise CudaKernelsUnavailable(
            f"scan backend 'cuda' got {device.type} tensors; move the model to the GPU or use backend 'torch'"
        )
    scan, conv, problem = _load()
    if problem:
        raise CudaKernelsUnavailable(f"scan backend 'cuda' cannot import {problem}; {INSTALL_HINT}")
    return scan, conv


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _c(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None


# mamba-ssm's own layout: u / delta / z (b, dim, L), A (dim, N), B / C (b, G, N, L), D / bias (dim,).
_FWD, _BWD = "shufflemamba::selective_scan_cuda", "shufflemamba::selective_scan_cuda_bwd"
torch.library.define(_FWD, f"({SCAN_SCHEMA}) -> (Tensor, Tensor, Tensor)")
torch.library.define(_BWD, f"(Tensor g_out, Tensor x, Tensor ungated, {SCAN_SCHEMA}) -> {GRADIENTS_SCHEMA}")


@torch.library.impl(_FWD, "default")
def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor, Tensor]:
    """mamba-ssm's forward: (output, the kernel's saved states x, the ungated output when z is given)."""
    kernels, _ = require_cuda_kernels(u.device)
    out, x, *rest = kernels.fwd(_c(u), _c(delta), A, _c(B), _c(C), _c(D), _c(z), delta_bias, delta_softplus)
    if z is None:
        return out, x, _empty(out)
    return rest[0], x, out  # with z the kernel returns the ungated out first and the gated out_z


@torch.library.register_fake(_FWD)
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    x = u.new_empty((batch, dim, -(-length // _CHUNK), 2 * A.shape[1]), dtype=A.dtype)
    return u.new_empty(u.shape), x, (u.new_empty(u.shape) if z is not None else _empty(u))


@torch.library.impl(_BWD, "default")
def _scan_bwd(g_out: Tensor, x: Tensor, ungated: Tensor, *scan) -> tuple[Tensor, ...]:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = scan
    kernels, _ = require_cuda_kernels(u.device)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = kernels.bwd(
        _c(u), _c(delta), A, _c(B), _c(C), _c(D), _c(z), delta_bias, g_out.contiguous(), x,
        ungated if z is not None else None, None, delta_softplus, False,
    )  # fmt: skip
    return (
        du,
        ddelta,
        dA,
        dB.to(B.dtype).contiguous(),
        dC.to(C.dtype).contiguous(),
        dD if D is not None else _empty(u),
        rest[0] if z is not None else _empty(u),
        ddelta_bias if delta_bias is not None else _empty(u),
    )


@torch.library.register_fake(_BWD)
def _(g_out, x, ungated, *scan):
    u = scan[0]
    return tuple(t.new_empty(t.shape) if t is not None else _empty(u) for t in ScanArgs(*scan).tensors())


def _setup_context(ctx, inputs, output) -> None:
    args = ScanArgs(*inputs)
    _, x, ungated = output
    ctx.delta_softplus = args.delta_softplus
    ctx.save_for_backward(*args.tensors(), x, ungated)


def _backward(ctx, g_out, _g_x, _g_ungated):
    *tensors, x, ungated = ctx.saved_tensors
    args = ScanArgs(*tensors, ctx.delta_softplus)
    return args.grads_for(torch.ops.shufflemamba.selective_scan_cuda_bwd(g_out, x, ungated, *args.flat()))


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def scan_cuda_op(args: ScanArgs) -> Tensor:
    """mamba-ssm's kernels on all-forward ``args`` -> (batch, L, K, E), channel-first in memory.

    The kernel does no dtype handling: u, delta, B, C, z are cast to u's dtype; A, D, bias to fp32."""
    batch, length, k, channels = args.delta.shape
    dtype = args.u.dtype

    def seq(t: Tensor | None) -> Tensor | None:  # (b, L, K, E) -> (b, K * E, L)
        return None if t is None else ScanArgs.to_channel_first(t.expand(batch, length, k, channels).to(dtype))

    def grouped(t: Tensor) -> Tensor:  # (b, L, K, N) -> (b, K, N, L)
        return t.to(dtype).permute(0, 2, 3, 1)

    def flat(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float().reshape(-1)

    out = torch.ops.shufflemamba.selective_scan_cuda(
        seq(args.u), seq(args.delta), args.A.float().reshape(k * channels, -1), grouped(args.B), grouped(args.C),
        flat(args.D), seq(args.z), flat(args.delta_bias), args.delta_softplus,
    )[0]  # fmt: skip
    return out.view(batch, k, channels, length).permute(0, 3, 1, 2)


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    """causal-conv1d on a logical (batch, L, C) x (channel-first in memory is free): (batch, L, C)."""
    _, conv = require_cuda_kernels(x.device)
    return conv(x.transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
