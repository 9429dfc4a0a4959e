"""Unwrapping the weights out of the checkpoint layouts in circulation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

_WRAPPER_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """``{"model": sd}`` / ``{"state_dict": sd}`` / a raw state dict -> the state dict, with the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes removed."""
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    out = {}
    for name, value in checkpoint.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = value
    return out
