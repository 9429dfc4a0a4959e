"""Mamba's initialisation of the SSM parameters, shared by the Vim and VMamba mixers.

Why these values: dt starts log-uniform in [dt_min, dt_max] (through the inverse of the
softplus applied to the bias), so each channel begins with its own time scale; A is the
S4D-real init -[1, 2, ..., N] stored as a log; D, the skip term, starts at one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
