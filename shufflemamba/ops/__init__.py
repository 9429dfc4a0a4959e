"""The selective-scan and causal-conv entry points used by the mixer, and their backends.

Backends share mamba-ssm's signatures:

- ``cuda``: mamba-ssm's selective-scan kernels (as the ``shufflemamba::selective_scan_cuda``
  custom op) and causal-conv1d's ``causal_conv1d_fn`` (custom ops of its own);
- ``torch``: :mod:`shufflemamba.ops.scan_torch`, chunked pure PyTorch, fast on CPU (as the
  ``shufflemamba::selective_scan_torch`` custom ops);
- ``reference``: :mod:`shufflemamba.ops.reference`, a plain loop, the ground truth.

The custom ops (:mod:`.custom_ops`) make every scan one opaque op for autograd and
``torch.compile``: a model compiles whole, without tracing the recurrence.

``auto`` (the default) takes ``cuda`` for CUDA tensors when the kernels import and
``torch`` otherwise. Override per model (``scan_backend=``), per process with the
environment variable ``SHUFFLEMAMBA_SCAN_BACKEND``, or temporarily with
:func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import Tensor

from .conv_torch import causal_conv1d_torch, is_token_major
from .cuda import CudaKernelsUnavailable, cuda_kernels_available, require_cuda_kernels
from .custom_ops import selective_scan_cuda_op, selective_scan_torch, selective_scan_torch_op
from .reference import causal_conv1d_reference, selective_scan_reference

BACKENDS = ("auto", "cuda", "torch", "reference")
_ENV = "SHUFFLEMAMBA_SCAN_BACKEND"
_override: str | None = None

__all__ = [
    "BACKENDS",
    "CudaKernelsUnavailable",
    "causal_conv1d",
    "cuda_kernels_available",
    "is_token_major",
    "resolve_backend",
    "selective_scan",
    "selective_scan_torch",
    "use_backend",
]


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every mixer inside the block (tests, benchmarks)."""
    global _override
    previous, _override = _override, _check(name)
    try:
        yield
    finally:
        _override = previous


def resolve_backend(requested: str, x: Tensor) -> str:
    """Pick the concrete backend for tensor ``x``: context override > env > requested > auto."""
    name = _override or os.environ.get(_ENV) or requested
    name = _check(name)
    if name == "auto":
        return "cuda" if x.is_cuda and cuda_kernels_available() else "torch"
    if name == "cuda":
        require_cuda_kernels(x)
    return name


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """y = selective scan of u (b, dim, L); B, C (b, N, L) or grouped (b, G, N, L)."""
    name = resolve_backend(backend, u)
    if name == "cuda":
        require_cuda_kernels(u)
        # The kernel does no autocast handling: u, delta, B, C, z share one dtype; A, D, bias are fp32.
        dtype = u.dtype
        return selective_scan_cuda_op(
            u,
            delta.to(dtype),
            A.float(),
            B.to(dtype),
            C.to(dtype),
            None if D is None else D.float(),
            None if z is None else z.to(dtype),
            None if delta_bias is None else delta_bias.float(),
            delta_softplus,
        )
    if name == "torch":
        return selective_scan_torch_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Depthwise causal conv over the last axis: x (b, dim, L), weight (dim, width); the result
    keeps x's layout (channel-first or token-major) on the cuda and torch backends."""
    name = resolve_backend(backend, x)
    if name == "cuda":
        _, conv = require_cuda_kernels(x)
        return conv(x, weight, bias, activation=activation)
    if name == "torch":
        return causal_conv1d_torch(x, weight, bias, activation)
    return causal_conv1d_reference(x, weight, bias, activation)
