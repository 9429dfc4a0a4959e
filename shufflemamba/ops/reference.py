"""Plain sequential selective scan: the ground truth every fast path is tested against.

Same signature and semantics as mamba-ssm's ``selective_scan_fn`` (and its
``selective_scan_ref``): inputs are channel-major ``(batch, dim, length)``, ``B``/``C``
are ``(batch, N, length)`` or grouped ``(batch, G, N, length)`` where channel ``d`` reads
group ``d // (dim // G)``. The loop is written for clarity, never for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_groups(mat: Tensor, dim: int) -> Tensor:
    """(b, N, L) -> (b, 1, N, L); (b, G, N, L) -> (b, dim, N, L) with each group repeated."""
    if mat.dim() == 3:
        return mat.unsqueeze(1)
    groups = mat.shape[1]
    if dim % groups:
        raise ValueError(f"dim {dim} is not divisible by {groups} B/C groups")
    return mat.repeat_interleave(dim // groups, dim=1)


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
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t h_t + D u_t ;  y *= silu(z).

    Computed one time step at a time in float32 (float64 if the inputs are float64).
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]
    Bx = _expand_groups(B.to(compute), dim)
    Cx = _expand_groups(C.to(compute), dim)
    A = A.to(compute)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dA = torch.exp(delta[:, :, t, None] * A)
        dBu = delta[:, :, t, None] * Bx[:, :, :, t] * u[:, :, t, None]
        h = dA * h + dBu
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(compute)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Depthwise causal conv over the last axis: x (b, dim, L), weight (dim, width)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation else out
