"""Depthwise causal conv1d in PyTorch for either layout of a (b, dim, L) input.

Channel-first contiguous input goes through ``F.conv1d``. Token-major input (stored (b, L, dim),
what the mixer keeps on CPU) goes through ``F.conv2d`` on a channels-last (b, dim, 1, L) view:
oneDNN convolves that layout natively, so the result stays token-major and no element-wise
transpose is paid (2.6x faster forward, 1.5x with backward than transposing to channel-first
for Vim-T's (8, 768, 197); numbers from docs/benchmarks.md's CPU section).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .reference import causal_conv1d_reference

__all__ = ["causal_conv1d_torch", "is_token_major"]


def is_token_major(x: Tensor) -> bool:
    """Whether a (b, dim, L) tensor is stored as (b, L, dim)."""
    return x.dim() == 3 and x.stride(1) == 1 and x.shape[1] > 1 and x.stride(2) == x.shape[1]


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """out[:, c, t] = act(bias[c] + sum_k weight[c, k] x[:, c, t - width + 1 + k]) (zero before t = 0),
    in x's layout."""
    if not is_token_major(x):
        return causal_conv1d_reference(x, weight, bias, activation)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    dim, width = weight.shape
    length = x.shape[-1]
    out = F.conv2d(x.unsqueeze(2), weight.view(dim, 1, 1, width), bias, padding=(0, width - 1), groups=dim)
    out = out[..., :length].squeeze(2)
    return F.silu(out) if activation else out
