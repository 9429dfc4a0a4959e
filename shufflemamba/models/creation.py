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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from timm.models import build_model_with_cfg
from torch import nn

__all__ = ["build_registered", "creation_context", "is_meta"]


def build_registered(
    cls: type,
    variant: str,
    pretrained: bool,
    filter_fn: Callable,
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
    out_indices: int | tuple[int, ...],
) -> nn.Module:
    """A registered size through timm's builder: the size table's ``defaults`` under the caller's
    ``kwargs``, official files through ``filter_fn``; ``out_indices`` is what ``features_only``
    returns unless the caller asks for other indices."""
    out_indices = kwargs.pop("out_indices", out_indices)
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**defaults, **kwargs},
    )


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
