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
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import DropPath, PatchEmbed, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import causal_conv1d, selective_scan
from .pretrained_cfg import imagenet_cfg
from .shuffle import LayerwiseShuffle, permute_tokens, restore_tokens
from .ssm_init import init_dt_projection_, s4d_real_log_a

__all__ = ["BiMambaMixer", "MambaBlock", "VisionMamba", "checkpoint_filter_fn", "resize_pos_embed"]

ClsPosition = Literal["middle", "head"]


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer: shared in/out projections, separate per-direction SSMs.

    out = out_proj((S_f(x) + flip(S_b(flip(x)))) / 2), each S gated by silu(z).
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
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.fused_directions = fused_directions
        self.scan_backend = scan_backend
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
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        y_f, y_b = self._both_directions_fused(x, z) if self.fused_directions else self._both_directions(x, z)
        return self.out_proj((y_f + y_b.flip(-1)).transpose(1, 2) / 2)

    def _both_directions(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The official structure: one conv + one scan per direction."""
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(
            x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        )
        return y_f, y_b

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D) -> Tensor:
        u = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, "silu", backend=self.scan_backend)
        x_dbl = torch.matmul(x_proj.weight, u)  # (B, R + 2N, L)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(dt_proj.weight, dt)  # (B, E, L)
        A = -torch.exp(A_log.float())
        return selective_scan(u, delta, A, B, C, D.float(), z, dt_proj.bias.float(), True, backend=self.scan_backend)

    def _both_directions_fused(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Both directions in one conv and one scan call: sequences stacked along channels,
        B/C grouped per direction (channel c reads group c // E)."""
        batch, inner, length = x.shape
        xs = torch.cat([x, x.flip(-1)], dim=1)
        zs = torch.cat([z, z.flip(-1)], dim=1)
        conv_w = torch.cat([self.conv1d.weight, self.conv1d_b.weight]).squeeze(1)
        conv_b = torch.cat([self.conv1d.bias, self.conv1d_b.bias])
        u = causal_conv1d(xs, conv_w, conv_b, "silu", backend=self.scan_backend)  # (B, 2E, L)
        x_w = torch.stack([self.x_proj.weight, self.x_proj_b.weight])  # (2, R + 2N, E)
        x_dbl = torch.matmul(x_w, u.view(batch, 2, inner, length))  # (B, 2, R + 2N, L)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dt_w = torch.stack([self.dt_proj.weight, self.dt_proj_b.weight])  # (2, E, R)
        delta = torch.matmul(dt_w, dt).view(batch, 2 * inner, length)
        A = -torch.exp(torch.cat([self.A_log, self.A_b_log]).float())
        D = torch.cat([self.D, self.D_b]).float()
        dt_bias = torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float()
        y = selective_scan(u, delta, A, B, C, D, zs, dt_bias, True, backend=self.scan_backend)
        return y[:, :inner], y[:, inner:]


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
    cls_position: ClsPosition = "middle",
) -> Tensor:
    """Bicubic resize of the patch part of a (1, M + 1, D) position embedding.

    The class-token entry (at M // 2 for Vim, 0 for ShuffleMamba) is kept and put back at
    the index the new grid uses. ``old_grid`` defaults to a square grid.
    """
    num_old = pos_embed.shape[1] - 1
    if old_grid is None:
        side = int(math.isqrt(num_old))
        if side * side != num_old:
            raise ValueError(f"cannot infer the grid of a {num_old}-patch position embedding; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    idx = _cls_index(num_old, cls_position)
    cls = pos_embed[:, idx : idx + 1]
    patches = torch.cat([pos_embed[:, :idx], pos_embed[:, idx + 1 :]], dim=1)
    patches = resample_abs_pos_embed(
        patches, list(new_grid), list(old_grid), num_prefix_tokens=0, interpolation="bicubic", antialias=False
    )
    new_idx = _cls_index(new_grid[0] * new_grid[1], cls_position)
    return torch.cat([patches[:, :new_idx], cls, patches[:, new_idx:]], dim=1)


class VisionMamba(nn.Module):
    """Plain (non-hierarchical) Vision Mamba with an optional stochastic layer-wise shuffle.

    Tokens: patch embeddings with one class token, in the middle (Vim) or at the head
    (ShuffleMamba), plus a learned absolute position embedding. The class token is read
    out after the final norm.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
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
        scan_backend: str = "auto",
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")
        if cls_position not in ("middle", "head"):
            raise ValueError(f"cls_position must be 'middle' or 'head', got {cls_position!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.cls_position = cls_position
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            strict_img_size=not dynamic_img_size,
            output_fmt="NHWC" if dynamic_img_size else None,  # keep the grid to resize pos_embed
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        norm_layer = partial(nn.RMSNorm if rms_norm else nn.LayerNorm, eps=norm_eps)
        # Vim's schedule: linspace(0, rate, depth) shifted by one; the final add uses the full rate.
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            [
                MambaBlock(
                    embed_dim,
                    norm_layer=norm_layer,
                    drop_path=dpr[i],
                    residual_in_fp32=residual_in_fp32,
                    d_state=d_state,
                    d_conv=d_conv,
                    expand=expand,
                    fused_directions=fused_directions,
                    scan_backend=scan_backend,
                )
                for i in range(depth)
            ]
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = norm_layer(embed_dim)
        self.shuffle = LayerwiseShuffle(shuffle_rate, depth, per_sample=shuffle_per_sample)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

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
        names = {"pos_embed", "cls_token"}
        for name, _ in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b"):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, one group per block, then the final norm."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward --------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> Tensor:
        """Patch embed, insert the class token, add the (resized if needed) position embedding."""
        x = self.patch_embed(x)
        if x.dim() == 4:  # dynamic_img_size: PatchEmbed keeps NHWC
            grid = tuple(x.shape[1:3])
            x = x.flatten(1, 2)
        else:
            grid = self.patch_embed.grid_size
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resize_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.cls_position)
        idx = _cls_index(x.shape[1], self.cls_position)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :idx], cls, x[:, idx:]], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, M + 1, D)."""
        hidden, residual = self._tokens(x), None
        for i, layer in enumerate(self.layers):
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
        residual = residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = x[:, _cls_index(x.shape[1] - 1, self.cls_position)]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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
        "shufflemamba_tiny_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_small_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_middle_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081"),
        "shufflemamba_base_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081", notes=("top-1 82.6",)),
        "shufflemamba_large_patch16_224.in1k": _cfg(paper_ids="arXiv:2408.17081", notes=("top-1 83.6",)),
    }
)

# name: (embed_dim, depth, rms_norm, cls_position, shuffle_rate, drop_path_rate). The one home of
# each size's rates: model YAMLs leave them null, recipes (conf/experiment) override.
# Published: ShuffleMamba-B shuffle 0.5 / drop path 0.5; Vim-T 0.0 and Vim-S 0.05 drop path.
# Our choice where nothing is published: both rates grow with model size (T 0.1/0.0,
# S 0.2/0.05, M 0.4/0.4, L 0.6/0.6), and Vim-B uses drop path 0.1.
VIM_SIZES: dict[str, tuple[int, int, bool, ClsPosition, float, float]] = {
    "vim_tiny_patch16_224": (192, 24, True, "middle", 0.0, 0.0),
    "vim_small_patch16_224": (384, 24, True, "middle", 0.0, 0.05),
    "vim_base_patch16_224": (768, 24, True, "middle", 0.0, 0.1),
    "shufflemamba_tiny_patch16_224": (192, 24, True, "head", 0.1, 0.0),
    "shufflemamba_small_patch16_224": (384, 24, True, "head", 0.2, 0.05),
    "shufflemamba_middle_patch16_224": (576, 32, False, "head", 0.4, 0.4),
    "shufflemamba_base_patch16_224": (768, 24, True, "head", 0.5, 0.5),
    "shufflemamba_large_patch16_224": (1024, 48, True, "head", 0.6, 0.6),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    embed_dim, depth, rms_norm, cls_position, shuffle_rate, drop_path_rate = VIM_SIZES[variant]
    defaults = dict(
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        rms_norm=rms_norm,
        cls_position=cls_position,
        shuffle_rate=shuffle_rate,
        drop_path_rate=drop_path_rate,
    )
    return build_model_with_cfg(
        VisionMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**defaults, **kwargs},
    )


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
