"""Vision Mamba (Vim, "bimamba v2") and ShuffleMamba: mixer, block, backbone, checkpoint
conversion and the registered sizes.

State-dict names and shapes follow the official hustvl/Vim and ShuffleMamba code, so
their checkpoint files load unchanged with ``strict=True``. The two directions of the
mixer are computed by one conv and one scan call by default (``fused_directions``):
both sequences are stacked along channels and the scan reads grouped B/C, which is
the same arithmetic as the official two calls (``fused_directions=False`` keeps
that structure, for comparison and as a fallback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    lecun_normal_,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import TorchScriptUnsupported
from ..ops import ScanArgs, ScanSettings, causal_conv1d, selective_scan
from .creation import build_registered, creation_context, is_meta
from .pretrained_cfg import imagenet_cfg
from .shuffle import LayerwiseShuffle, permute_tokens, restore_tokens
from .ssm_init import init_dt_projection_, s4d_real_log_a

__all__ = ["BiMambaMixer", "MambaBlock", "VisionMamba", "checkpoint_filter_fn", "resize_pos_embed"]

ClsPosition = Literal["middle", "head"]


@register_notrace_module  # FX: one leaf (its layout follows the device its tensors are on, known only at run time)
class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer: shared in/out projections, separate per-direction SSMs.

    out = out_proj((S_f(x) + flip(S_b(flip(x)))) / 2), each S gated by silu(z).

    ``fused_directions`` (default) computes both directions in one conv and one scan call; how
    depends on the backend (``scan_backend``: a name, None for the default, or a resolved
    :class:`~shufflemamba.ops.ScanSettings`): on ``triton`` the reversed direction is read by
    index (anti-causal conv, reversed scan order, the mean written by the kernel: no flipped
    copies); elsewhere both sequences are stacked along channels (the reversed one flipped) and
    the scan reads grouped B/C. ``fused_directions=False`` keeps the official two-call structure.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        fused_directions: bool = True,
        scan_backend: str | ScanSettings | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.fused_directions = fused_directions
        self.scan_settings = ScanSettings.of(scan_backend)
        inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, inner, bias=True))
        # A_log / A_b_log and D / D_b: the official names (note "A_b_log", not "A_log_b").
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.A_b_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.D_b = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        if not is_meta(self):
            self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
        """Mamba init, applied to both directions (the official code leaves dt_proj_b at
        PyTorch's default and then zeroes its bias; we give both directions the same start)."""
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            init_dt_projection_(dt_proj.weight, dt_proj.bias, dt_min, dt_max, dt_init_floor)
        a_log = s4d_real_log_a(self.d_inner, self.d_state)
        self.A_log.copy_(a_log)
        self.A_b_log.copy_(a_log)
        self.D.fill_(1.0)
        self.D_b.fill_(1.0)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, D) -> (B, L, D)."""
        xz = self.in_proj(hidden)  # (B, L, 2E)
        backend = self.scan_settings.backend_for(xz)
        if not self.fused_directions:
            return self.out_proj(self._official(xz, channel_first=backend == "cuda"))
        if backend == "triton":
            return self.out_proj(self._directions_by_index(xz))
        return self.out_proj(self._stacked(xz, channel_first=backend == "cuda"))

    # ---- the per-direction parameters, both directions stacked --------------------------------
    def _ssm_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """A (2, E, N), D (2, E), dt bias (2, E) in fp32, forward direction first."""
        A = -torch.exp(torch.stack([self.A_log, self.A_b_log]).float())
        return A, torch.stack([self.D, self.D_b]).float(), torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float()

    def _conv_parameters(self) -> tuple[Tensor, Tensor]:
        """conv weights (2, E, W) and biases (2, E), forward direction first."""
        return (
            torch.stack([self.conv1d.weight, self.conv1d_b.weight]).squeeze(2),
            torch.stack([self.conv1d.bias, self.conv1d_b.bias]),
        )

    # ---- the three layouts ------------------------------------------------------------------------
    def _official(self, xz: Tensor, channel_first: bool) -> Tensor:
        """The official structure: one conv + one scan per direction, the reversed one on flipped copies."""
        x, z = xz.chunk(2, dim=-1)  # (B, L, E) each
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, channel_first)
        y_b = self._direction(
            x.flip(1), z.flip(1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, channel_first
        )
        return (y_f + y_b.flip(1)) / 2

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D, channel_first: bool) -> Tensor:
        """One direction in its scan order: x, z (B, L, E) -> y (B, L, E)."""
        weight = conv.weight.transpose(0, 1)  # (1, E, W)
        u = causal_conv1d(x, weight, conv.bias[None], "silu", settings=self.scan_settings).squeeze(2)
        x_dbl = _linear(u, x_proj.weight, channel_first)  # (B, L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = _linear(dt, dt_proj.weight, channel_first)  # (B, L, E)
        args = ScanArgs(
            u[:, :, None], delta[:, :, None], -torch.exp(A_log.float())[None], B[:, :, None], C[:, :, None],
            D.float()[None], z[:, :, None], dt_proj.bias.float()[None], delta_softplus=True,
        )  # fmt: skip
        return selective_scan(args, self.scan_settings).squeeze(2)

    def _stacked(self, xz: Tensor, channel_first: bool) -> Tensor:
        """Both directions in one conv and one scan: the sequences stacked along channels (the
        reversed one flipped), B/C grouped per direction. xz (B, L, 2E) -> y (B, L, E).

        On the torch backend every tensor stays token-major, (B, L, channels) in memory, from
        in_proj to out_proj: on CPU an element-wise transpose to channel-first costs more than the
        conv it feeds (docs/benchmarks.md). mamba-ssm's kernels get channel-first tensors."""
        batch, length, _ = xz.shape
        inner, rank, d_state = self.d_inner, self.dt_rank, self.d_state
        x, z = xz.chunk(2, dim=-1)
        if channel_first:  # (B, 2E, L) contiguous, written by cat in one pass, then seen as (B, L, 2E)
            x, z = x.transpose(1, 2), z.transpose(1, 2)
            xs = torch.cat([x, x.flip(-1)], dim=1).transpose(1, 2)
            zs = torch.cat([z, z.flip(-1)], dim=1).transpose(1, 2)
        else:  # (B, L, 2E) contiguous
            xs, zs = torch.cat([x, x.flip(1)], dim=-1), torch.cat([z, z.flip(1)], dim=-1)
        conv_w, conv_b = self._conv_parameters()
        u = causal_conv1d(xs, conv_w.reshape(1, 2 * inner, -1), conv_b.reshape(1, -1), "silu",
                          settings=self.scan_settings).squeeze(2)  # (B, L, 2E), stored as xs  # fmt: skip
        if channel_first:
            x_w = torch.stack([self.x_proj.weight, self.x_proj_b.weight])  # (2, R + 2N, E)
            x_dbl = torch.matmul(x_w, u.transpose(1, 2).reshape(batch, 2, inner, length))  # (B, 2, R + 2N, L)
            dt, B, C = x_dbl.split([rank, d_state, d_state], dim=2)
            dt_w = torch.stack([self.dt_proj.weight, self.dt_proj_b.weight])  # (2, E, R)
            delta = torch.matmul(dt_w, dt).permute(0, 3, 1, 2)  # (B, L, 2, E), channel-first in memory
            B, C = B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2)  # (B, L, 2, N)
        else:
            # Per-direction projections as one linear with block-diagonal weights (zeros add exactly).
            x_w = torch.block_diag(self.x_proj.weight, self.x_proj_b.weight)  # (2(R + 2N), 2E)
            x_dbl = F.linear(u, x_w).view(batch, length, 2, -1)  # (B, L, 2, R + 2N)
            dt, B, C = x_dbl.split([rank, d_state, d_state], dim=-1)
            dt_w = torch.block_diag(self.dt_proj.weight, self.dt_proj_b.weight)  # (2E, 2R)
            delta = F.linear(dt.reshape(batch, length, 2 * rank), dt_w).view(batch, length, 2, inner)
        A, D, dt_bias = self._ssm_parameters()
        two = (batch, length, 2, inner)
        y = selective_scan(ScanArgs(u.view(two), delta, A, B, C, D, zs.view(two), dt_bias, True), self.scan_settings)
        y_f, y_b = y.unbind(2)  # unbind, not y[:, :, k]: its backward stacks once instead of zero-filling twice
        return (y_f + y_b.flip(1)) / 2

    def _directions_by_index(self, xz: Tensor) -> Tensor:
        """Both directions in one conv and one scan launch with nothing flipped: the reversed
        direction's conv is anti-causal and its scan walks the tokens backwards; the kernel writes
        (y_f + y_b) / 2 in token order. xz (B, L, 2E) -> y (B, L, E)."""
        batch, length, _ = xz.shape
        inner, rank, d_state = self.d_inner, self.dt_rank, self.d_state
        x, z = xz.chunk(2, dim=-1)  # views of in_proj's output, read in place
        conv_w, conv_b = self._conv_parameters()
        u = causal_conv1d(x, conv_w, conv_b, "silu", BIDIRECTIONAL, self.scan_settings)  # (B, L, 2, E)
        x_w = torch.block_diag(self.x_proj.weight, self.x_proj_b.weight)  # (2(R + 2N), 2E)
        x_dbl = F.linear(u.view(batch, length, 2 * inner), x_w).view(batch, length, 2, -1)
        dt, B, C = x_dbl.split([rank, d_state, d_state], dim=-1)  # (B, L, 2, .) views
        dt_w = torch.block_diag(self.dt_proj.weight, self.dt_proj_b.weight)  # (2E, 2R)
        delta = F.linear(dt.reshape(batch, length, 2 * rank), dt_w).view(batch, length, 2, inner)
        A, D, dt_bias = self._ssm_parameters()
        args = ScanArgs(u, delta, A, B, C, D, z.unsqueeze(2), dt_bias, True, directions=BIDIRECTIONAL, combine="mean")
        return selective_scan(args, self.scan_settings)


BIDIRECTIONAL = ("forward", "reverse")


def _linear(x: Tensor, weight: Tensor, channel_first: bool) -> Tensor:
    """x (B, L, in) @ weight.T -> (B, L, out); channel-first in memory when asked (mamba-ssm's layout)."""
    if channel_first:
        return torch.matmul(weight, x.transpose(1, 2)).transpose(1, 2)
    return F.linear(x, weight)


class MambaBlock(nn.Module):
    """Pre-norm residual block with the residual stream carried separately (mamba-ssm style)."""

    def __init__(
        self,
        dim: int,
        norm_layer: type[nn.Module],
        drop_path: float = 0.0,
        residual_in_fp32: bool = True,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.norm = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


def _cls_index(num_patches: int, cls_position: ClsPosition) -> int:
    return num_patches // 2 if cls_position == "middle" else 0


def resize_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    cls_position: ClsPosition | None = "middle",
) -> Tensor:
    """Bicubic resize of the patch part of a (1, M [+ 1], D) position embedding.

    The class-token entry (at M // 2 for Vim, 0 for ShuffleMamba) is kept and put back at
    the index the new grid uses; ``cls_position=None`` for embeddings with no class slot
    (the register models keep their tokens' embedding apart). ``old_grid`` defaults to a square grid.
    """
    has_cls = cls_position is not None
    num_old = pos_embed.shape[1] - int(has_cls)
    if old_grid is None:
        side = int(math.isqrt(num_old))
        if side * side != num_old:
            raise ValueError(f"cannot infer the grid of a {num_old}-patch position embedding; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    resample = partial(
        resample_abs_pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=0,
        interpolation="bicubic",
        antialias=False,
    )
    if not has_cls:
        return resample(pos_embed)
    idx = _cls_index(num_old, cls_position)
    cls = pos_embed[:, idx : idx + 1]
    patches = resample(torch.cat([pos_embed[:, :idx], pos_embed[:, idx + 1 :]], dim=1))
    new_idx = _cls_index(new_grid[0] * new_grid[1], cls_position)
    return torch.cat([patches[:, :new_idx], cls, patches[:, new_idx:]], dim=1)


class PatchEmbed(nn.Module):
    """Conv patch embedding whose stride may be smaller than its kernel (Vim's "finer
    granularity" models: kernel 16, stride 8, a 27 x 27 grid at 224 px). Same state-dict name
    (``proj``) as timm's ``PatchEmbed``; returns tokens (B, N, D) (their grid: :meth:`feat_size`)."""

    def __init__(
        self, img_size: int | tuple[int, int], patch_size: int, stride: int, in_chans: int, embed_dim: int, strict: bool
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.stride = to_2tuple(img_size), to_2tuple(patch_size), to_2tuple(stride)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict = strict
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid of an input of ``img_size`` (H, W)."""
        return tuple((s - k) // st + 1 for s, k, st in zip(img_size, self.patch_size, self.stride, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.strict:
            x = check_image_size(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


# FX leaves for any trace, where this module calls them (timm's registry patches only the root's module)
torch.fx.wrap("check_image_size")
torch.fx.wrap("permute_tokens")
torch.fx.wrap("restore_tokens")


@register_notrace_function  # FX: a node, so a traced model checks its input size too
def check_image_size(x: Tensor, img_size: tuple[int, int]) -> Tensor:
    """x, or a one-line error when its (H, W) is not the size the model was built for."""
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"input size {tuple(x.shape[-2:])} does not match the model's {tuple(img_size)}; "
            f"build it with img_size=... or dynamic_img_size=True"
        )
    return x


class VisionMamba(nn.Module):
    """Plain (non-hierarchical) Vision Mamba with an optional stochastic layer-wise shuffle.

    Tokens: patch embeddings with one class token, in the middle (Vim) or at the head
    (ShuffleMamba), plus a learned absolute position embedding. The class token is read
    out after the final norm. The token layout and the readout are small overridable
    methods (:mod:`.vim_reg` places register tokens through the sequence instead).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rms_norm: bool = True,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shuffle_rate: float = 0.0,
        shuffle_per_sample: bool = False,
        cls_position: ClsPosition = "middle",
        fused_directions: bool = True,
        scan_backend: str | ScanSettings | None = None,
        dynamic_img_size: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        prefix_tokens: Any = None,
    ) -> None:
        super().__init__()
        # A variant's own token settings, passed in and stored first: the token / head methods a
        # variant overrides read them while this constructor builds (see .vim_reg).
        self.prefix_tokens = prefix_tokens
        if global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")
        if cls_position not in ("middle", "head"):
            raise ValueError(f"cls_position must be 'middle' or 'head', got {cls_position!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.cls_position = cls_position
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.norm_layer = partial(nn.RMSNorm if rms_norm else nn.LayerNorm, eps=norm_eps)
        # Vim's schedule: linspace(0, rate, depth) shifted by one; the final add uses the full rate.
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        scan_settings = ScanSettings.of(scan_backend)  # resolved once: every block runs the same way
        with creation_context(device, dtype):
            self.patch_embed = PatchEmbed(
                img_size, patch_size, stride or patch_size, in_chans, embed_dim, strict=not dynamic_img_size
            )
            self._init_tokens(self.patch_embed.num_patches)
            self.pos_drop = nn.Dropout(drop_rate)
            self.layers = nn.ModuleList(
                [
                    MambaBlock(
                        embed_dim,
                        norm_layer=self.norm_layer,
                        drop_path=dpr[i],
                        residual_in_fp32=residual_in_fp32,
                        d_state=d_state,
                        d_conv=d_conv,
                        expand=expand,
                        fused_directions=fused_directions,
                        scan_backend=scan_settings,
                    )
                    for i in range(depth)
                ]
            )
            self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
            self.norm_f = self.norm_layer(embed_dim)
            self.shuffle = LayerwiseShuffle(shuffle_rate, depth, per_sample=shuffle_per_sample)
            self.layer_shuffle: nn.Module | None = None  # LayerShuffle, attached by .layer_shuffle.with_layer_shuffle
            self._init_head(num_classes)
        # timm's feature contract (features_only=True, FeatureGetterNet): the residual stream after each block
        self.feature_info = [
            dict(module=f"layers.{i}", num_chs=embed_dim, reduction=self.patch_embed.stride[0]) for i in range(depth)
        ]
        if not is_meta(self):
            self.init_weights()

    # ---- what the register variant overrides ------------------------------------------------
    def _init_tokens(self, num_patches: int) -> None:
        """One class token; one position embedding for patches and class token together."""
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, self.embed_dim))

    def _init_head(self, num_classes: int) -> None:
        self.head_hidden_size = self.embed_dim
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def token_positions(self, num_patches: int) -> Tensor:
        """Indices of the readout tokens in the sequence of ``num_patches`` patches."""
        return torch.tensor([_cls_index(num_patches, self.cls_position)])

    def _insert_tokens(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens (B, M, D) -> the sequence with the class token, plus position embedding."""
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resize_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.cls_position)
        idx = _cls_index(grid[0] * grid[1], self.cls_position)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :idx], cls, x[:, idx:]], dim=1) + pos_embed

    @torch.no_grad()
    def init_weights(self) -> None:
        """Vim's init: trunc-normal tokens and head, lecun-normal patch conv, zero Linear biases
        (dt_proj excepted), out_proj rescaled by 1/sqrt(depth) (GPT-2 style)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        depth = len(self.layers)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            out_proj.weight.div_(math.sqrt(depth))

    # ---- timm model surface -------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and the SSM's A / D (both directions) never decay; timm adds every 1-D tensor."""
        names = {name for name, _ in self.named_parameters() if name.startswith(("pos_embed", "cls_token"))}
        for name, _ in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b"):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem (patch embedding, tokens and their
        position embeddings), one group per block, then everything after the blocks."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f|^neck|^norm_neck", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, features out), on the model's device and dtype."""
        if global_pool is not None and global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        factory = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **factory) if num_classes > 0 else nn.Identity()

    def __prepare_scriptable__(self) -> nn.Module:
        raise TorchScriptUnsupported(type(self).__name__)

    # ---- forward --------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images -> the token sequence with position embedding, and the patch grid (a constant unless
        ``dynamic_img_size``, so FX traces the fixed-size model without reading shapes)."""
        grid = self.patch_embed.feat_size(tuple(x.shape[-2:])) if self.dynamic_img_size else self.patch_embed.grid_size
        return self.pos_drop(self._insert_tokens(self.patch_embed(x), grid)), grid

    def _run_blocks(
        self, hidden: Tensor, take: Sequence[int] = (), stop: int | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The blocks (shuffle, checkpointing) up to ``stop``: last hidden, last residual, and the
        residual stream (residual + block output) after each block in ``take``."""
        residual, taken = None, []
        layers = self.layers[:stop]
        # LayerShuffle: this forward's block order (the slot sets the token shuffle's depth-linear rate);
        # without it, the stored order (the path FX traces)
        order = range(len(layers)) if self.layer_shuffle is None else self.layer_shuffle.order(len(layers))
        for i, block in enumerate(order):
            layer = layers[block]
            if self.layer_shuffle is not None:
                extra = self.layer_shuffle.enter(block, i, hidden if residual is None else residual + hidden)
                if extra is not None:
                    hidden = hidden + extra
            perm = self.shuffle.sample(i, hidden)
            if perm is not None:
                hidden = permute_tokens(hidden, perm)
                residual = None if residual is None else permute_tokens(residual, perm)
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if perm is not None:
                hidden, residual = restore_tokens(hidden, perm), restore_tokens(residual, perm)
            if self.layer_shuffle is not None:
                self.layer_shuffle.leave(block, i, residual + hidden)
            if i in take:
                taken.append(residual + hidden)
        return hidden, residual, taken

    def _final(self, hidden: Tensor, residual: Tensor) -> Tensor:
        residual = residual + self.drop_path(hidden)
        weight = getattr(self.norm_f, "weight", None)  # norm_f is an Identity once pruned
        return self.norm_f(residual if weight is None else residual.to(weight.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, M + prefix tokens, D)."""
        hidden, _ = self._tokens(x)
        hidden, residual, _ = self._run_blocks(hidden)
        return self._final(hidden, residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = x[:, _cls_index(x.shape[1] - 1, self.cls_position)]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- intermediate features (timm's API, for detection / segmentation backbones) -----
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The residual stream after the blocks in ``indices`` (last n if int, all if None),
        optionally through ``norm_f``; NCHW maps of the patch tokens (class / register tokens
        split off, returned beside them with ``return_prefix_tokens``) or NLC sequences."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        hidden, grid = self._tokens(x)
        hidden, residual, intermediates = self._run_blocks(hidden, take, max_index + 1 if stop_early else None)
        if norm:
            intermediates = [self.norm_f(y.to(self.norm_f.weight.dtype)) for y in intermediates]
        num_patches = grid[0] * grid[1]
        prefix_idx = self.token_positions(num_patches).to(x.device)
        keep = torch.ones(num_patches + len(prefix_idx), dtype=torch.bool, device=x.device)
        keep[prefix_idx] = False
        prefix = [y[:, prefix_idx] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y[:, keep].reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2) for y in intermediates]
        else:
            intermediates = [y[:, keep] for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self._final(hidden, residual), intermediates  # with stop_early: after the last block taken

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last index taken (and the final norm / head if asked)."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]  # the shuffle keeps its depth: same p per kept block
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionMamba) -> dict[str, Tensor]:
    """An official Vim / ShuffleMamba state dict (already unwrapped, as timm and
    :func:`shufflemamba.checkpoint.load_weights` pass it) -> this model's: the position
    embedding resized to the model's grid. Names are already the official ones.
    """
    out = {}
    for name, value in state_dict.items():
        if name == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resize_pos_embed(value, model.patch_embed.grid_size, None, model.cls_position)
        out[name] = value
    return out


# ---- registered sizes -----------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return imagenet_cfg(
        pool_size=None,
        fixed_input_size=True,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", notes=("top-1 76.1",)),
        "vim_small_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", notes=("top-1 80.5",)),
        "vim_base_patch16_224.in1k": _cfg(paper_ids="arXiv:2401.09417", notes=("top-1 81.9",)),
        "vim_tiny_patch16_stride8_224.in1k": _cfg(paper_ids="arXiv:2401.09417", notes=("top-1 78.3",)),
        "vim_small_patch16_stride8_224.in1k": _cfg(paper_ids="arXiv:2401.09417", notes=("top-1 81.6",)),
        "shufflemamba_tiny_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_small_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_middle_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_base_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081", notes=("top-1 82.6",)),
        "shufflemamba_large_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081", notes=("top-1 83.6",)),
    }
)


@dataclass(frozen=True)
class VimSize:
    """A registered size: its architecture and its default regularisation rates (the one home
    of the rates; model YAMLs leave them null, recipes override)."""

    embed_dim: int
    depth: int
    rms_norm: bool
    cls_position: ClsPosition
    shuffle_rate: float
    drop_path_rate: float
    stride: int | None = None  # patch-embedding stride (None: the patch size); 8 for the "finer granularity" models


# Published: ShuffleMamba-B shuffle 0.5 / drop path 0.5; Vim-T 0.0 and Vim-S 0.05 drop path; the
# stride-8 models are fine-tuned with drop path 0. Our choice where nothing is published: both
# rates grow with model size (T 0.1/0.0, S 0.2/0.05, M 0.4/0.4, L 0.6/0.6), Vim-B drop path 0.1.
VIM_SIZES: dict[str, VimSize] = {
    "vim_tiny_patch16_224": VimSize(192, 24, True, "middle", 0.0, 0.0),
    "vim_small_patch16_224": VimSize(384, 24, True, "middle", 0.0, 0.05),
    "vim_base_patch16_224": VimSize(768, 24, True, "middle", 0.0, 0.1),
    "vim_tiny_patch16_stride8_224": VimSize(192, 24, True, "middle", 0.0, 0.0, stride=8),
    "vim_small_patch16_stride8_224": VimSize(384, 24, True, "middle", 0.0, 0.0, stride=8),
    "shufflemamba_tiny_patch16_224": VimSize(192, 24, True, "head", 0.1, 0.0),
    "shufflemamba_small_patch16_224": VimSize(384, 24, True, "head", 0.2, 0.05),
    "shufflemamba_middle_patch16_224": VimSize(576, 32, False, "head", 0.4, 0.4),
    "shufflemamba_base_patch16_224": VimSize(768, 24, True, "head", 0.5, 0.5),
    "shufflemamba_large_patch16_224": VimSize(1024, 48, True, "head", 0.6, 0.6),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    size = VIM_SIZES[variant]
    defaults = dict(
        patch_size=16,
        stride=size.stride,
        embed_dim=size.embed_dim,
        depth=size.depth,
        rms_norm=size.rms_norm,
        cls_position=size.cls_position,
        shuffle_rate=size.shuffle_rate,
        drop_path_rate=size.drop_path_rate,
    )
    # features_only: the last 3 blocks, as timm's ViT
    return build_registered(VisionMamba, variant, pretrained, checkpoint_filter_fn, defaults, kwargs, out_indices=3)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("vim_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("vim_small_patch16_224", pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("vim_base_patch16_224", pretrained, **kwargs)


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("vim_tiny_patch16_stride8_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("vim_small_patch16_stride8_224", pretrained, **kwargs)


@register_model
def shufflemamba_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("shufflemamba_tiny_patch16_224", pretrained, **kwargs)


@register_model
def shufflemamba_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("shufflemamba_small_patch16_224", pretrained, **kwargs)


@register_model
def shufflemamba_middle_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("shufflemamba_middle_patch16_224", pretrained, **kwargs)


@register_model
def shufflemamba_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("shufflemamba_base_patch16_224", pretrained, **kwargs)


@register_model
def shufflemamba_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    return _create("shufflemamba_large_patch16_224", pretrained, **kwargs)
