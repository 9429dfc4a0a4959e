"""Mamba's initialisation of the SSM parameters, shared by the Vim, VMamba and MSVMamba mixers;
and the stacked per-direction SSM parameters of the 2-D mixers (SS2D, MS2D), official layout.

Why these values: dt starts log-uniform in [dt_min, dt_max] (through the inverse of the
softplus applied to the bias), so each channel begins with its own time scale; A is the
S4D-real init -[1, 2, ..., N] stored as a log; D, the skip term, starts at one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import ScanSettings


@torch.no_grad()
def init_dt_projection_(
    weight: Tensor,
    bias: Tensor,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_init_floor: float = 1e-4,
) -> None:
    """In place: weight ~ U(+-rank^-0.5) (rank = last axis), softplus(bias) log-uniform in [dt_min, dt_max]."""
    std = weight.shape[-1] ** -0.5
    weight.uniform_(-std, std)
    dt = torch.exp(torch.rand(bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def s4d_real_log_a(channels: int, d_state: int) -> Tensor:
    """log of A = [1, ..., d_state] for every channel, (channels, d_state) float32."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(channels, 1)


class DirectionalSSM(nn.Module):
    """The parameters of ``k`` selective scans over ``inner`` channels, stacked along a leading
    direction axis as the official VMamba / MSVMamba code stores them: ``x_proj_weight`` (k, R +
    2N, E), ``dt_projs_weight`` (k, E, R), ``dt_projs_bias`` (k, E), ``A_logs`` (k E, N), ``Ds``
    (k E,). A base class, so the names stay the mixer's own (``op.x_proj_weight``)."""

    def _init_directional_ssm(
        self, k: int, d_model: int, d_state: int, ssm_ratio: float, dt_rank: int | str, scan_backend: Any
    ) -> int:
        """The k parameter sets, the sizes (``d_inner``, ``dt_rank``: ceil(d_model / 16) for "auto")
        and the scan settings (resolved once); returns d_inner."""
        self.d_state = d_state
        self.d_inner = inner = int(ssm_ratio * d_model)
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_settings = ScanSettings.of(scan_backend)
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, inner))
        self.A_logs = nn.Parameter(torch.empty(k * inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * inner))
        return inner

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
        """Official init: x_proj as nn.Linear's default, Mamba's dt / A / D init per direction."""
        k, inner = self.dt_projs_bias.shape
        self.x_proj_weight.uniform_(-(inner**-0.5), inner**-0.5)
        for i in range(k):
            init_dt_projection_(self.dt_projs_weight[i], self.dt_projs_bias[i], dt_min, dt_max, dt_init_floor)
        self.A_logs.copy_(s4d_real_log_a(k * inner, self.A_logs.shape[1]))
        self.Ds.fill_(1.0)
