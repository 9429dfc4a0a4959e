"""VMamba (arXiv:2401.10166): the published "v05_noz" VSS block with SS2D, the 4-stage
hierarchy, and the registered sizes ``vmamba_tiny`` / ``vmamba_small`` / ``vmamba_base``.

SS2D reads the (H, W) map of the block as four sequences (row-major, column-major and
their reverses, :mod:`shufflemamba.ops.cross_scan`), runs one selective scan per direction
with its own x_proj / dt_proj / A / D, maps the outputs back and sums them. All four
directions go through ONE :func:`shufflemamba.ops.selective_scan` call: the sequences are
stacked along channels and B/C are grouped per direction, exactly as for Vim's fused
mixer, so the torch path runs on CPU and mamba-ssm's kernel on GPU.

Layout: activations are kept channels-last (B, H, W, C) so that the projections and
norms are plain ``nn.Linear`` / ``nn.LayerNorm``; only the depthwise conv, the scan and the
stem/downsampling convs see (B, C, H, W). State-dict names and shapes are those of the
official MzeroMiko/VMamba code (``channel_first`` / ``ln2d`` builds, whose ``Linear2d`` keeps
2-D weights), so its checkpoints load unchanged; 1x1-conv-shaped weights are squeezed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn
from torchvision.ops import Permute

from ..ops import ScanArgs, ScanSettings, selective_scan
from ..ops.cross_scan import NUM_DIRECTIONS, cross_merge, cross_scan
from .creation import creation_context, is_meta
from .hierarchy import HierarchicalBackbone, create_hierarchical, hierarchical_cfg
from .ssm_init import DirectionalSSM

__all__ = ["SS2D", "VMamba", "VSSBlock", "checkpoint_filter_fn"]


@register_notrace_module  # FX: one leaf (its layout follows the device its tensors are on, known only at run time)
class SS2D(DirectionalSSM):
    """2-D selective scan, "v05_noz": in-proj, 3x3 depthwise conv, SiLU, 4-direction scan,
    merge, LayerNorm, out-proj. No gate branch (``noz``). Input and output (B, H, W, C)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_backend: str | ScanSettings | None = None,
    ) -> None:
        super().__init__()
        inner = self._init_directional_ssm(NUM_DIRECTIONS, d_model, d_state, ssm_ratio, dt_rank, scan_backend)
        self.in_proj = nn.Linear(d_model, inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=conv_bias)
        self.act = nn.SiLU()
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        if not is_meta(self):
            self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        x = self.act(self.conv2d(self.in_proj(x).permute(0, 3, 1, 2)))  # (B, E, H, W)
        by_index = self.scan_settings.backend_for(x) == "triton"
        y = self.scan_by_index(x) if by_index else self.scan_2d(x).transpose(1, 2)  # (B, L, E) row-major
        y = self.out_norm(y.reshape(batch, height, width, self.d_inner))
        return self.out_proj(y)

    def _ssm_parameters(self) -> tuple[Tensor, Tensor]:
        """A and D per direction: (K * E, N) and (K * E,); fp32 for fp32 models (the scan computes in fp32)."""
        return -torch.exp(self.A_logs), self.Ds

    def scan_2d(self, x: Tensor) -> Tensor:
        """(B, E, H, W) -> (B, E, H * W) row-major: the four directional scans, merged. The four
        sequences are materialised (cross-scan) and stacked along channels, B/C grouped per direction."""
        batch, inner, height, width = x.shape
        length, k, n = height * width, NUM_DIRECTIONS, self.d_state
        xs = cross_scan(x)  # (B, K, E, L)
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, K, R + 2N, L)
        dts, Bs, Cs = x_dbl.split([self.dt_rank, n, n], dim=2)
        delta = torch.matmul(self.dt_projs_weight, dts)  # (B, K, E, L)
        A, D = self._ssm_parameters()
        args = ScanArgs.from_channel_first(
            xs.reshape(batch, k * inner, length),
            delta.reshape(batch, k * inner, length),
            A,  # the scan runs A / D / dt bias in fp32 (fp64 models: fp64)
            Bs.contiguous(),  # grouped: channel c of the stack reads direction c // E
            Cs.contiguous(),
            D,
            None,
            self.dt_projs_bias.reshape(-1),
            True,
        )
        ys = ScanArgs.to_channel_first(selective_scan(args, self.scan_settings))  # (B, K * E, L)
        return cross_merge(ys.view(batch, k, inner, length), height, width)

    def scan_by_index(self, x: Tensor) -> Tensor:
        """(B, E, H, W) -> (B, H * W, E): the same four scans with nothing materialised: every
        direction reads the row-major tokens in its own order (row / column-major, reversed), one
        kernel launch writes their sum."""
        batch, inner, height, width = x.shape
        length, k, n = height * width, NUM_DIRECTIONS, self.d_state
        tokens = x.permute(0, 2, 3, 1).reshape(batch, length, inner)  # a view when x is channels-last
        x_dbl = F.linear(tokens, self.x_proj_weight.reshape(-1, inner)).view(batch, length, k, -1)
        dts, Bs, Cs = x_dbl.split([self.dt_rank, n, n], dim=-1)  # (B, L, K, .)
        delta = torch.einsum("blkr,ker->blke", dts, self.dt_projs_weight)  # (B, L, K, E)
        A, D = self._ssm_parameters()
        args = ScanArgs(
            tokens.unsqueeze(2), delta, A.view(k, inner, n), Bs, Cs, D.view(k, inner), None,
            self.dt_projs_bias, True, directions=CROSS_SCAN_ORDERS, grid=(height, width), combine="sum",
        )  # fmt: skip
        return selective_scan(args, self.scan_settings)


# VMamba's four scans, in cross_scan's order: row-major, column-major, and both reversed.
CROSS_SCAN_ORDERS = ("forward", "columns", "reverse", "columns_reverse")


class VSSBlock(nn.Module):
    """x + DP(SS2D(LN(x))), then x + DP(MLP(LN(x))); channels-last."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        **ssm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _stem(in_chans: int, dim: int, eps: float) -> nn.Sequential:
    """Two 3x3 stride-2 convs with LN (GELU between); indices match the official "v2" stem."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
        Permute([0, 2, 3, 1]),
        nn.LayerNorm(dim // 2, eps=eps),
        Permute([0, 3, 1, 2]),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
        Permute([0, 2, 3, 1]),
        nn.LayerNorm(dim, eps=eps),
    )


def _downsample(dim: int, out_dim: int, eps: float) -> nn.Sequential:
    """3x3 stride-2 conv + LN; indices match the official "v3" downsampling."""
    return nn.Sequential(
        Permute([0, 3, 1, 2]),
        nn.Conv2d(dim, out_dim, 3, stride=2, padding=1),
        Permute([0, 2, 3, 1]),
        nn.LayerNorm(out_dim, eps=eps),
    )


class VMamba(HierarchicalBackbone):
    """4-stage VMamba: conv stem (/4), VSS blocks with conv downsampling (/8, /16, /32),
    LN + global average pool + linear head. Any input size works (no position embedding)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: int | Sequence[int] = 96,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_eps: float = 1e-5,
        scan_backend: str | ScanSettings | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims, rates = self._init_surface(num_classes, global_pool, dims, depths, drop_path_rate)
        ssm_kwargs = dict(
            d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias,
            scan_backend=ScanSettings.of(scan_backend),  # resolved once for every block
        )  # fmt: skip
        with creation_context(device, dtype):
            self.patch_embed = _stem(in_chans, dims[0], norm_eps)
            self._build_stages(
                dims,
                rates,
                lambda dim, rate: VSSBlock(dim, drop_path=rate, mlp_ratio=mlp_ratio, norm_eps=norm_eps, **ssm_kwargs),
                lambda dim, out: _downsample(dim, out, norm_eps),
            )
            self._build_classifier(drop_rate, norm_eps)
        if not is_meta(self):
            self.init_weights()


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VMamba) -> dict[str, Tensor]:
    """An official VMamba state dict (already unwrapped) -> this model's.

    Names are already the official ones; weights saved from a 1x1 ``nn.Conv2d`` (4-D) are
    squeezed to the 2-D ``nn.Linear`` shape, as the official ``Linear2d`` does on load.
    """
    own = model.state_dict()
    out = {}
    for name, value in state_dict.items():
        if name in own and value.dim() == 4 and own[name].dim() == 2 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        out[name] = value
    return out


# ---- registered sizes -----------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return hierarchical_cfg("arXiv:2401.10166", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny.in1k": _cfg(notes=("top-1 82.6",)),
        "vmamba_small.in1k": _cfg(notes=("top-1 83.6",)),
        "vmamba_base.in1k": _cfg(notes=("top-1 83.9",)),
    }
)


@dataclass(frozen=True)
class VMambaSize:
    """A registered size (all d_state 1, mlp_ratio 4, "v05_noz") and its drop path (its one home;
    model YAMLs leave it null), as the Vim and register size tables."""

    dims: int  # stage 1 width, doubled per stage
    depths: tuple[int, ...]
    ssm_ratio: float
    drop_path_rate: float


# Published: T 30.2M / 82.6, S 50.1M / 83.6, B 88.6M / 83.9 (drop path 0.2 / 0.3 / 0.6).
VMAMBA_SIZES: dict[str, VMambaSize] = {
    "vmamba_tiny": VMambaSize(96, (2, 2, 8, 2), 1.0, 0.2),
    "vmamba_small": VMambaSize(96, (2, 2, 15, 2), 2.0, 0.3),
    "vmamba_base": VMambaSize(128, (2, 2, 15, 2), 2.0, 0.6),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VMamba:
    size = VMAMBA_SIZES[variant]
    defaults = dict(dims=size.dims, depths=size.depths, ssm_ratio=size.ssm_ratio, drop_path_rate=size.drop_path_rate)
    return create_hierarchical(VMamba, variant, pretrained, checkpoint_filter_fn, defaults, kwargs)


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    return _create("vmamba_tiny", pretrained, **kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    return _create("vmamba_small", pretrained, **kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    return _create("vmamba_base", pretrained, **kwargs)
