"""Depthwise causal conv1d in PyTorch on a logical (batch, L, C) input, in either memory layout.

Token-major input (stored (batch, L, C), what the mixer keeps on CPU) goes through ``F.conv2d`` on
a channels-last (batch, C, 1, L) view: oneDNN convolves that layout natively, so the result stays
token-major and no element-wise transpose is paid (2.6x faster forward, 1.5x with backward than
transposing to channel-first for Vim-T's (8, 768, 197); docs/benchmarks.md's CPU section).
Channel-first input goes through ``F.conv1d``. The layout is a speed choice only: the meaning
is in the shape.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .reference import causal_conv1d_reference

__all__ = ["causal_conv1d_torch"]


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """out[:, t, c] = act(bias[c] + sum_k weight[c, k] x[:, t - width + 1 + k, c]) (zero before t = 0):
    x (batch, L, C), weight (C, width) -> (batch, L, C), stored as x is."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    channel_first = x.transpose(1, 2)
    if x.stride(-1) != 1 or x.shape[-1] == 1:
        return causal_conv1d_reference(channel_first, weight, bias, activation).transpose(1, 2)
    dim, width = weight.shape
    length = x.shape[1]
    out = F.conv2d(channel_first.unsqueeze(2), weight.view(dim, 1, 1, width), bias, padding=(0, width - 1), groups=dim)
    out = out[..., :length].squeeze(2)
    return (F.silu(out) if activation else out).transpose(1, 2)
