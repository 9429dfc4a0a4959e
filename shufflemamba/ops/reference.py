"""Plain sequential selective scan and depthwise conv: the ground truth every fast path is tested
against. Written for clarity, never for speed.

:func:`scan_reference` takes a :class:`~shufflemamba.ops.args.ScanArgs` (any directions and
combine: each direction's tokens are gathered into its scan order with explicit index arrays,
scanned forward one step at a time, and put back). :func:`selective_scan_reference` is the same
recurrence with mamba-ssm's ``selective_scan_fn`` / ``selective_scan_ref`` signature:
channel-major ``(batch, dim, length)`` inputs, ``B`` / ``C`` ``(batch, N, length)`` or grouped
``(batch, G, N, length)`` where channel ``d`` reads group ``d // (dim // G)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .args import ScanArgs

__all__ = ["causal_conv1d_reference", "conv1d_reference", "scan_reference", "selective_scan_reference"]


def _forward_scan(args: ScanArgs) -> tuple[Tensor, Tensor]:
    """All-forward ``args`` (batch, L, K, E) -> (y (batch, L, K, E) in u's dtype, last state (batch, K, E, N)).

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t ;  y_t = C_t h_t + D u_t ;  y *= silu(z), computed one
    time step at a time in float32 (float64 if the inputs are float64)."""
    compute = torch.float64 if args.u.dtype == torch.float64 else torch.float32
    u = args.u.to(compute).expand_as(args.delta)
    delta = args.delta.to(compute)
    if args.delta_bias is not None:
        delta = delta + args.delta_bias.to(compute)
    if args.delta_softplus:
        delta = F.softplus(delta)
    A, Bm, Cm = args.A.to(compute), args.B.to(compute), args.C.to(compute)
    batch, length, k, channels = delta.shape
    h = u.new_zeros(batch, k, channels, A.shape[-1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, t, :, :, None] * A)
        dBu = (delta[:, t] * u[:, t])[..., None] * Bm[:, t, :, None, :]
        h = dA * h + dBu
        ys.append((h * Cm[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if args.D is not None:
        y = y + u * args.D.to(compute)
    if args.z is not None:
        y = y * F.silu(args.z.to(compute))
    return y.to(args.u.dtype), h


def scan_reference(args: ScanArgs) -> Tensor:
    """The scan of ``args``, shaped as :meth:`ScanArgs.output_shape`."""
    flat = args.in_scan_order()
    y, _ = _forward_scan(flat)
    return args.from_scan_order(y)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_ref``: y (batch, dim, L), and the last state (batch, dim, N)."""
    args = ScanArgs.from_channel_first(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y, h = _forward_scan(args)
    y = ScanArgs.to_channel_first(y)
    return (y, h.reshape(u.shape[0], u.shape[1], -1)) if return_last_state else y


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Depthwise causal conv over the last axis: x (b, dim, L), weight (dim, width)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation else out


def conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    directions: tuple[str, ...] | None = None,
) -> Tensor:
    """x (batch, L, E) -> (batch, L, K, E) for weight (K, E, W), bias (K, E): direction k's causal
    conv, run on the reversed sequence and reversed back for a ``reverse`` direction."""
    directions = directions or ("forward",) * weight.shape[0]
    channel_first = x.transpose(1, 2)
    outs = []
    for k, direction in enumerate(directions):
        if direction not in ("forward", "reverse"):
            raise ValueError(f"the conv runs forward or reverse, got direction {direction!r}")
        seq = channel_first.flip(-1) if direction == "reverse" else channel_first
        out = causal_conv1d_reference(seq, weight[k], None if bias is None else bias[k], activation)
        outs.append(out.flip(-1) if direction == "reverse" else out)
    return torch.stack(outs, dim=1).permute(0, 3, 1, 2)
