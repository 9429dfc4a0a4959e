"""The selective-scan and causal-conv entry points used by the mixers, and their backends.

One argument bundle, :class:`ScanArgs` (logical token-major shapes, directions as token orders,
an optional combine of the directions), and one settings object, :class:`ScanSettings`
(resolved once when a model is built: which backend, and its knobs), go through every layer.
Backends:

- ``triton``: our kernels (:mod:`.triton_kernels`, as custom ops in :mod:`.triton_ops`): every
  direction read by index, all directions in one launch, the combined output written once;
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests);
- ``cuda``: mamba-ssm's selective-scan kernels and causal-conv1d's conv (:mod:`.cuda`);
- ``torch``: :mod:`.scan_torch`, chunked pure PyTorch, fast on CPU (custom ops in :mod:`.torch_ops`);
- ``reference``: :mod:`.reference`, a plain loop, the ground truth.

Every scan is one opaque custom op for autograd and ``torch.compile``: a model compiles whole
without tracing a recurrence. Backends without native direction support (torch, cuda) get each
direction's tokens gathered into scan order first and the outputs put back (:meth:`ScanArgs.in_scan_order`);
the mixers avoid that on those backends by laying the directions out themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .args import COMBINES, DIRECTIONS, ScanArgs, token_order
from .conv_torch import causal_conv1d_torch
from .cuda import CudaKernelsUnavailable, causal_conv1d_cuda, cuda_kernels_available, scan_cuda_op
from .reference import conv1d_reference, scan_reference, selective_scan_reference
from .settings import BACKENDS, ScanSettings, TritonConfig, describe_scan, scan_settings_of, set_scan_backend
from .torch_ops import scan_torch_op, selective_scan_torch
from .triton_ops import TritonUnavailable, conv1d_triton, selective_scan_triton, triton_available

__all__ = [
    "BACKENDS",
    "COMBINES",
    "DIRECTIONS",
    "CudaKernelsUnavailable",
    "ScanArgs",
    "ScanSettings",
    "TritonConfig",
    "TritonUnavailable",
    "causal_conv1d",
    "cuda_kernels_available",
    "describe_scan",
    "scan_settings_of",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
    "set_scan_backend",
    "token_order",
    "triton_available",
]


def selective_scan(args: ScanArgs, settings: ScanSettings | str | None = None) -> Tensor:
    """The scan of ``args`` on the backend ``settings`` names for its tensors' device; the result
    is shaped as :meth:`ScanArgs.output_shape`. Unsupported inputs fail here with one clear message."""
    settings = ScanSettings.of(settings)
    args.check()
    backend = settings.backend_for(args.u)
    if backend == "triton":
        return selective_scan_triton(args, settings.triton)
    if backend == "reference":
        return scan_reference(args)
    flat = args.in_scan_order()
    out = scan_torch_op(flat, settings) if backend == "torch" else scan_cuda_op(flat)
    return args.from_scan_order(out)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    directions: tuple[str, ...] | None = None,
    settings: ScanSettings | str | None = None,
) -> Tensor:
    """Depthwise conv of a logical (batch, L, C) x, one per direction: weight (K, C, W), bias (K, C)
    -> (batch, L, K, C). Direction k is causal in its scan order: ``forward`` reads the W - 1
    tokens before t, ``reverse`` the W - 1 after (the causal conv of the reversed sequence)."""
    settings = ScanSettings.of(settings)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"conv: x must be (batch, L, C) and weight (K, C, W), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    directions = directions or ("forward",) * weight.shape[0]
    if len(directions) != weight.shape[0] or any(d not in ("forward", "reverse") for d in directions):
        raise ValueError(
            f"conv: one direction, forward or reverse, per weight; got {directions} for K = {weight.shape[0]}"
        )
    backend = settings.backend_for(x)
    if backend == "triton":
        return conv1d_triton(x, weight, bias, directions, activation is not None, settings.triton)
    if backend == "reference":
        return conv1d_reference(x, weight, bias, activation, directions)
    conv = causal_conv1d_torch if backend == "torch" else causal_conv1d_cuda
    outs = []
    for k, direction in enumerate(directions):
        seq = x.flip(1) if direction == "reverse" else x
        out = conv(seq, weight[k], None if bias is None else bias[k], activation)
        outs.append(out.flip(1) if direction == "reverse" else out)
    return outs[0].unsqueeze(2) if len(outs) == 1 else torch.stack(outs, dim=2)
