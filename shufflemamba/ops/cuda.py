"""Lazy bindings to mamba-ssm's selective scan and causal-conv1d's conv kernels.

Neither package imports on a machine without their compiled extensions (mamba-ssm
imports ``selective_scan_cuda`` and transformers at import time), so nothing here
is imported before a CUDA tensor asks for it, and a failed import is turned into
one actionable message instead of an ImportError traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

INSTALL_HINT = (
    "install the CUDA extras on a GPU machine with `pip install -e '.[cuda]'`, or offline with "
    "`bash scripts/build_cuda_ext.sh DIR_WITH_SDISTS` (see README, 'GPU install')"
)


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
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    except Exception as exc:  # compiled extension missing, ABI mismatch, transformers missing...
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


def require_cuda_kernels(*tensors: Tensor) -> tuple[Callable, Callable]:
    """Return (selective_scan_fn, causal_conv1d_fn) or raise a message naming what is missing."""
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable(f"scan backend 'cuda' needs a CUDA GPU, but torch sees none; {INSTALL_HINT}")
    off_gpu = [tuple(t.shape) for t in tensors if t is not None and not t.is_cuda]
    if off_gpu:
        raise CudaKernelsUnavailable(
            f"scan backend 'cuda' got CPU tensors of shapes {off_gpu}; move the model to the GPU or use backend 'torch'"
        )
    scan, conv, problem = _load()
    if problem:
        raise CudaKernelsUnavailable(f"scan backend 'cuda' cannot import {problem}; {INSTALL_HINT}")
    return scan, conv
