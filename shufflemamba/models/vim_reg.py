"""ShuffleMamba-Reg: the Vim / ShuffleMamba backbone with register tokens (Mamba-Reg style).

Instead of one class token, ``n`` register tokens with their own position embedding are spread
evenly through the patch sequence: with ``L = HW // (n + 1)`` patches between them, token ``i``
sits at ``(i + 1) L + i`` and the ``HW - nL`` leftover patches follow the last token. The
patch position embedding has no class slot. The readout takes the ``n`` token outputs of
``norm_f``, projects each through ``neck`` (D -> D / r, no bias), flattens them, normalises
(``norm_neck``) and classifies; with ``cls_reduce`` r = 1 there is no neck and no norm_neck.
The layer-wise shuffle permutes every token, registers included, and restores the order.

State-dict names and shapes are the official ``mambar_*`` ones (ShuffleMamba ``models_reg.py``),
so their files load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import register_notrace_function, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from .creation import build_registered
from .pretrained_cfg import imagenet_cfg
from .vim import VisionMamba, resize_pos_embed

__all__ = ["REG_SIZES", "VisionMambaReg", "register_layout"]


def register_layout(num_patches: int, num_tokens: int) -> tuple[Tensor, Tensor]:
    """(order, token positions): ``order`` indexes ``cat([patches, tokens])`` into the sequence;
    token ``i`` lands at ``(i + 1) L + i`` with ``L = num_patches // (num_tokens + 1)``."""
    gap = num_patches // (num_tokens + 1)
    order = []
    for i in range(num_tokens):
        order.extend(range(i * gap, (i + 1) * gap))
        order.append(num_patches + i)
    order.extend(range(num_tokens * gap, num_patches))
    positions = [(i + 1) * gap + i for i in range(num_tokens)]
    return torch.tensor(order), torch.tensor(positions)


@dataclass(frozen=True)
class RegisterTokens:
    """The register layout: ``num`` tokens spread through the sequence, read out through a neck
    that reduces each from D to D / ``reduce`` (no neck for 1)."""

    num: int
    reduce: int

    def __post_init__(self) -> None:
        if self.num < 1 or self.reduce < 1 or self.num % self.reduce:
            raise ValueError(f"need num_cls_tokens >= 1 divisible by cls_reduce >= 1, got {self.num}, {self.reduce}")


class VisionMambaReg(VisionMamba):
    """Vision Mamba with ``num_cls_tokens`` register tokens and the neck readout (see module doc)."""

    def __init__(self, *args: Any, num_cls_tokens: int = 12, cls_reduce: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, prefix_tokens=RegisterTokens(num_cls_tokens, cls_reduce), **kwargs)

    @property
    def num_cls_tokens(self) -> int:
        return self.prefix_tokens.num

    @property
    def cls_reduce(self) -> int:
        return self.prefix_tokens.reduce

    def _init_tokens(self, num_patches: int) -> None:
        n, dim = self.num_cls_tokens, self.embed_dim
        self.num_prefix_tokens = n
        self.cls_token = nn.Parameter(torch.zeros(1, n, dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, n, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))

    def _init_head(self, num_classes: int) -> None:
        n, r, dim = self.num_cls_tokens, self.cls_reduce, self.embed_dim
        if r > 1:
            self.neck = nn.Linear(dim, dim // r, bias=False)
            self.norm_neck = self.norm_layer(dim * n // r)
        self.head_hidden_size = dim * (n // r)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def token_positions(self, num_patches: int) -> Tensor:
        return register_layout(num_patches, self.num_cls_tokens)[1]

    def _insert_tokens(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resize_pos_embed(pos_embed, grid, self.patch_embed.grid_size, cls_position=None)
        tokens = self.cls_token.expand(x.shape[0], -1, -1) + self.pos_embed_cls
        order, _ = register_layout(grid[0] * grid[1], self.num_cls_tokens)
        return take_tokens(torch.cat([x + pos_embed, tokens], dim=1), order)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Vim's init, plus the official one for what is new: trunc-normal(0.02) register
        tokens, their position embedding and the neck."""
        super().init_weights()
        trunc_normal_(self.pos_embed_cls, std=0.02)
        if self.cls_reduce > 1:
            trunc_normal_(self.neck.weight, std=0.02)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = take_register_tokens(x, self.num_cls_tokens)  # (B, n, D)
            x = self.norm_neck(self.neck(x).flatten(1)) if self.cls_reduce > 1 else x.flatten(1)
        return x if pre_logits else self.head(x)


@register_notrace_function  # FX: the index tensor moves to x's device at run time
def take_tokens(x: Tensor, positions: Tensor) -> Tensor:
    """x[:, positions] with ``positions`` (a constant of the layout) on x's device."""
    return x[:, positions.to(x.device)]


@register_notrace_function  # FX: the layout follows the sequence length, known at run time
def take_register_tokens(x: Tensor, num_tokens: int) -> Tensor:
    """The ``num_tokens`` register tokens of a sequence x (B, patches + num_tokens, D)."""
    return take_tokens(x, register_layout(x.shape[1] - num_tokens, num_tokens)[1])


torch.fx.wrap("take_tokens")  # leaves for any FX trace (timm's registry reaches only the root's module)
torch.fx.wrap("take_register_tokens")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionMambaReg) -> dict[str, Tensor]:
    """An official ``mambar_*`` state dict (already unwrapped) -> this model's: the patch
    position embedding (no class slot) resized to the model's grid."""
    out = {}
    for name, value in state_dict.items():
        if name == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resize_pos_embed(value, model.patch_embed.grid_size, None, cls_position=None)
        out[name] = value
    return out


# ---- registered sizes -----------------------------------------------------------------------
@dataclass(frozen=True)
class RegSize:
    """A registered register-token size and its default rates (their one home)."""

    embed_dim: int
    depth: int
    num_cls_tokens: int
    cls_reduce: int
    shuffle_rate: float
    drop_path_rate: float


# Published (run_reg.sh, the final stage): shuffle 0.1, drop path 0.4 for Reg-B; Reg-L's rates
# are not published, we use the same.
REG_SIZES: dict[str, RegSize] = {
    "shufflemamba_reg_base_patch16_224": RegSize(768, 24, 12, 4, 0.1, 0.4),
    "shufflemamba_reg_large_patch16_224": RegSize(1024, 48, 16, 8, 0.1, 0.4),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return imagenet_cfg(
        crop_pct=1.0,  # the recipe's last stage evaluates uncropped
        pool_size=None,
        fixed_input_size=True,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        paper_ids="arXiv:2408.17081",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "shufflemamba_reg_base_patch16_224.in1k": _cfg(notes=("top-1 83.1",)),
        "shufflemamba_reg_large_patch16_224.in1k": _cfg(notes=("top-1 83.6",)),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    size = REG_SIZES[variant]
    defaults = dict(
        patch_size=16,
        embed_dim=size.embed_dim,
        depth=size.depth,
        rms_norm=True,
        cls_position="head",  # unused: the registers have their own layout
        num_cls_tokens=size.num_cls_tokens,
        cls_reduce=size.cls_reduce,
        shuffle_rate=size.shuffle_rate,
        drop_path_rate=size.drop_path_rate,
    )
    return build_registered(VisionMambaReg, variant, pretrained, checkpoint_filter_fn, defaults, kwargs, out_indices=3)


@register_model
def shufflemamba_reg_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    return _create("shufflemamba_reg_base_patch16_224", pretrained, **kwargs)


@register_model
def shufflemamba_reg_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMambaReg:
    return _create("shufflemamba_reg_large_patch16_224", pretrained, **kwargs)
