"""MSVMamba (arXiv:2405.14174): multi-scale VMamba, the sizes ``msvmamba_nano`` / ``micro`` /
``tiny`` (published 77.3 / 79.8 / 82.8 top-1).

Each block's MS2D scans the map twice, at two scales, through our selective-scan entry point
(every backend): ONE direction (row-major) over the full-resolution map after a 3x3 depthwise
conv, and THREE directions over a stride-2 map after a 7x7 depthwise conv — reversed row-major,
column-major and reversed column-major concatenated into one sequence of 3 h w tokens, scanned
once (the state runs across the joins) with the other parameter set. Each branch is normalised
(one shared LayerNorm), the three low-resolution outputs are mapped back and summed, upsampled
bilinearly and added to the full-resolution one; a squeeze-excitation gate, the ``z`` gate and
the out-projection follow. The block's MLP is a ConvFFN (1x1, depthwise 3x3 residual, GELU, 1x1).

Layout: channels-last (B, H, W, C) between blocks, every norm a LayerNorm over the last axis.
State-dict names and shapes are the official ones (YuHengsss/MSVMamba), so its checkpoints load
unchanged: ``patch_embed.{0,2}``, ``layers.{i}.blocks.{j}.{norm, op, convFFN, norm2}``,
``layers.{i}.downsample.{norm, reduction}``, ``classifier.{norm, head}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn
from torchvision.ops import Permute

from ..ops import ScanArgs, ScanSettings, selective_scan
from .creation import creation_context, is_meta
from .hierarchy import HierarchicalBackbone, create_hierarchical, hierarchical_cfg
from .ssm_init import DirectionalSSM

__all__ = ["MSVMAMBA_SIZES", "MS2D", "MSVMamba", "checkpoint_filter_fn", "low_resolution_orders"]

FULL, LOW = 1, 0  # the parameter set of the full-resolution scan and of the stride-2 one (official)


def low_resolution_orders(height: int, width: int, device=None) -> Tensor:
    """Row-major positions read by the concatenated stride-2 sequence: reversed row-major, then
    column-major, then reversed column-major (3 h w steps)."""
    rows = torch.arange(height * width, device=device)
    columns = rows.view(height, width).t().reshape(-1)  # step s -> token of row s % h, column s // h
    return torch.cat([rows.flip(0), columns, columns.flip(0)])


class SqueezeExcite(nn.Module):
    """Channel gate on a (B, H, W, C) map: mean over space -> C/r -> ReLU -> C -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(1, 2)))).view(x.shape[0], 1, 1, -1)


@register_notrace_module  # FX: one leaf (the scan backend follows the device, known at run time)
class MS2D(DirectionalSSM):
    """Multi-scale 2-D selective scan (see the module doc). Input and output (B, H, W, C)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        se_reduction: int = 8,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_backend: str | ScanSettings | None = None,
    ) -> None:
        super().__init__()
        inner = self._init_directional_ssm(2, d_model, d_state, ssm_ratio, dt_rank, scan_backend)  # LOW, FULL
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.conv2d_b1 = nn.Conv2d(inner, inner, 7, stride=2, padding=3, groups=inner)
        self.out_norm = nn.LayerNorm(inner)
        self.se = SqueezeExcite(inner, se_reduction)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        if not is_meta(self):
            self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    def scan(self, tokens: Tensor, k: int) -> Tensor:
        """One forward selective scan of ``tokens`` (B, L, E) with parameter set ``k`` -> (B, L, E)."""
        inner, n = self.d_inner, self.d_state
        x_dbl = F.linear(tokens, self.x_proj_weight[k])  # (B, L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, n, n], dim=-1)
        delta = F.linear(dt, self.dt_projs_weight[k])  # (B, L, E)
        part = slice(k * inner, (k + 1) * inner)
        args = ScanArgs(
            tokens.unsqueeze(2), delta.unsqueeze(2), -torch.exp(self.A_logs[part]).unsqueeze(0), B.unsqueeze(2),
            C.unsqueeze(2), self.Ds[part].unsqueeze(0), None, self.dt_projs_bias[k].unsqueeze(0), True,
        )  # fmt: skip
        return selective_scan(args, self.scan_settings).squeeze(2)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        xc = x.permute(0, 3, 1, 2)  # (B, E, H, W)
        full = F.silu(self.conv2d(xc))
        low = F.silu(self.conv2d_b1(xc))  # from the in-projection, not from ``full``
        h1, w1 = low.shape[-2:]
        y = self.out_norm(self.scan(full.flatten(2).transpose(1, 2), FULL))  # (B, H W, E)
        order = low_resolution_orders(h1, w1, x.device)
        y_low = self.out_norm(self.scan(low.flatten(2).transpose(1, 2)[:, order], LOW))  # (B, 3 h1 w1, E)
        merged = y_low.new_zeros(batch, h1 * w1, self.d_inner).index_add(1, order, y_low)  # segments summed
        merged = merged.transpose(1, 2).reshape(batch, self.d_inner, h1, w1)
        merged = F.interpolate(merged, size=(height, width), mode="bilinear", align_corners=False)
        y = y.view(batch, height, width, self.d_inner) + merged.permute(0, 2, 3, 1)
        return self.out_proj(self.se(y) * F.silu(z))


class ConvFFN(nn.Module):
    """1x1 conv C -> h, h + depthwise 3x3(h), GELU, 1x1 conv h -> C; channels-last in and out."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.linear2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x.permute(0, 3, 1, 2))
        h = F.gelu(h + self.dwc(h))
        return self.linear2(h).permute(0, 2, 3, 1)


class MSVSSBlock(nn.Module):
    """x + DP(MS2D(LN(x))), then x + DP(ConvFFN(LN(x))); channels-last."""

    def __init__(self, dim: int, drop_path: float = 0.0, ffn_ratio: float = 2.0, **ssm_kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = MS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.convFFN = ConvFFN(dim, int(dim * ffn_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.convFFN(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (H offset first; odd sides padded at the bottom / right),
    LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class MSVMamba(HierarchicalBackbone):
    """4-stage MSVMamba: 4x4 patch embedding (/4), MS-VSS blocks with patch merging (/8, /16,
    /32), LN + global average pool + linear head. Any input size (no position embedding)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (1, 2, 9, 2),
        dims: int | Sequence[int] = 96,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        ffn_ratio: float = 2.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        scan_backend: str | ScanSettings | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims, rates = self._init_surface(num_classes, global_pool, dims, depths, drop_path_rate)
        ssm_kwargs = dict(d_state=d_state, ssm_ratio=ssm_ratio, scan_backend=ScanSettings.of(scan_backend))
        with creation_context(device, dtype):
            self.patch_embed = nn.Sequential(
                nn.Conv2d(in_chans, dims[0], 4, stride=4), Permute([0, 2, 3, 1]), nn.LayerNorm(dims[0])
            )
            self._build_stages(
                dims,
                rates,
                lambda dim, rate: MSVSSBlock(dim, drop_path=rate, ffn_ratio=ffn_ratio, **ssm_kwargs),
                PatchMerging,
            )
            self._build_classifier(drop_rate)
        if not is_meta(self):
            self.init_weights()


def checkpoint_filter_fn(state_dict: dict[str, Any], model: MSVMamba) -> dict[str, Tensor]:
    """An official MSVMamba state dict (already unwrapped) -> this model's: the names are the
    official ones; nothing to convert."""
    return dict(state_dict)


# ---- registered sizes -----------------------------------------------------------------------
@dataclass(frozen=True)
class MSVMambaSize:
    """A registered size (d_state 1, ssm_ratio 2, MS2D in all stages, SE, ConvFFN) and its drop
    path (its one home; model YAMLs leave it null), as the other size tables."""

    dims: int
    depths: tuple[int, ...]
    drop_path_rate: float


# Published (classification/configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml): 6.86M / 11.88M / 33.05M,
# 77.3 / 79.8 / 82.8 top-1, drop path 0.2.
MSVMAMBA_SIZES: dict[str, MSVMambaSize] = {
    "msvmamba_nano": MSVMambaSize(48, (1, 2, 5, 2), 0.2),
    "msvmamba_micro": MSVMambaSize(64, (1, 2, 5, 2), 0.2),
    "msvmamba_tiny": MSVMambaSize(96, (1, 2, 9, 2), 0.2),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return hierarchical_cfg("arXiv:2405.14174", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "msvmamba_nano.in1k": _cfg(notes=("top-1 77.3",)),
        "msvmamba_micro.in1k": _cfg(notes=("top-1 79.8",)),
        "msvmamba_tiny.in1k": _cfg(notes=("top-1 82.8",)),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    size = MSVMAMBA_SIZES[variant]
    defaults = dict(dims=size.dims, depths=size.depths, drop_path_rate=size.drop_path_rate)
    return create_hierarchical(MSVMamba, variant, pretrained, checkpoint_filter_fn, defaults, kwargs)


@register_model
def msvmamba_nano(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    return _create("msvmamba_nano", pretrained, **kwargs)


@register_model
def msvmamba_micro(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    return _create("msvmamba_micro", pretrained, **kwargs)


@register_model
def msvmamba_tiny(pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    return _create("msvmamba_tiny", pretrained, **kwargs)
