"""Where and in what dtype a model is created: timm's ``device=`` / ``dtype=`` creation kwargs.

``timm.create_model(name, device="meta")`` builds a model without allocating its weights (then
``to_empty`` + load a checkpoint: cheap for the large sizes), ``dtype=torch.bfloat16`` builds it in
bf16 directly. Our families build inside :func:`creation_context`: the default device and the
default floating dtype are set for the construction only, so every parameter (ours, torch's and
timm's layers, whatever their version accepts) is created there; and nothing is initialised on
``meta``, where there is nothing to initialise (:func:`is_meta`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["creation_context", "is_meta"]


@contextlib.contextmanager
def creation_context(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Tensors created inside default to ``device`` and to the floating ``dtype`` (None: unchanged)."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, previous)
        yield


def is_meta(module: nn.Module) -> bool:
    """Whether the module's parameters live on the meta device (nothing to initialise)."""
    return any(p.is_meta for p in module.parameters(recurse=True))
