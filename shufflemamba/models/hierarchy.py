"""What the four-stage (hierarchical) families share: a stage of blocks followed by its
downsampling, and timm's model surface over ``patch_embed`` -> ``layers`` (stages) ->
``classifier`` (``norm`` + ``head``), channels-last features. VMamba and MSVMamba differ only in
their blocks, stem and downsampling; the surface (classifier, grad checkpointing, layer-decay
groups, intermediate features, pruning) is written once here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import TorchScriptUnsupported
from .creation import build_registered
from .pretrained_cfg import imagenet_cfg


def hierarchical_cfg(paper: str, **kwargs: Any) -> dict[str, Any]:
    """The pretrained_cfg of a four-stage family: any input size, 7 x 7 final map at 224, the
    stem's first conv and the classifier's head named as timm's tools expect."""
    return imagenet_cfg(
        pool_size=(7, 7),
        fixed_input_size=False,
        first_conv="patch_embed.0",
        classifier="classifier.head",
        license="mit",
        paper_ids=paper,
        **kwargs,
    )


def create_hierarchical(
    cls: type, variant: str, pretrained: bool, filter_fn: Callable, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """:func:`build_registered` for a four-stage family: ``features_only`` gives every stage by
    default, as timm's CNNs."""
    return build_registered(cls, variant, pretrained, filter_fn, defaults, kwargs, out_indices=(0, 1, 2, 3))


class Stage(nn.Module):
    """A stage: its blocks (``blocks``), then its downsampling (``downsample``; Identity last)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def run_blocks(self, x: Tensor) -> Tensor:
        """The stage's blocks, without the downsampling that follows them."""
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.run_blocks(x))


class HierarchicalBackbone(nn.Module):
    """timm's model surface for ``patch_embed`` (whose first module is a conv), ``layers`` (a
    ModuleList of :class:`Stage`), ``classifier`` (ModuleDict of ``norm`` and ``head``) and
    ``head_drop``; features channels-last (B, H, W, C), average pooled. Subclasses build those
    and set ``num_features``, ``num_classes``, ``global_pool``."""

    output_fmt = "NHWC"  # features are channels-last, as timm's Swin / MambaOut

    @staticmethod
    def check_global_pool(global_pool: str) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")

    def _init_surface(
        self,
        num_classes: int,
        global_pool: str,
        dims: int | Sequence[int],
        depths: Sequence[int],
        drop_path_rate: float,
    ) -> tuple[list[int], list[list[float]]]:
        """Record the surface's settings (classes, pooling, widths, timm's feature contract: each
        stage's map after its blocks, strides 4 .. 32); return the stage widths (an int doubles per
        stage) and each stage's drop-path rates (linspace(0, rate) over all blocks)."""
        self.check_global_pool(global_pool)
        depths = list(depths)
        dims = [int(dims) * 2**i for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have one entry per stage")
        self.num_classes, self.global_pool, self.dims = num_classes, global_pool, dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [
            dict(module=f"layers.{i}.blocks", num_chs=dim, reduction=4 * 2**i) for i, dim in enumerate(dims)
        ]
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(depths[:i]) for i in range(len(depths) + 1)]
        return dims, [rates[starts[i] : starts[i + 1]] for i in range(len(depths))]

    def _build_stages(
        self,
        dims: list[int],
        rates: list[list[float]],
        block: Callable[[int, float], nn.Module],
        downsample: Callable[[int, int], nn.Module],
    ) -> None:
        """``layers``: stage i of ``block(width, drop path)`` per rate, then ``downsample(width,
        next width)`` (none after the last)."""
        self.layers = nn.ModuleList()
        for i, dim in enumerate(dims):
            blocks = [block(dim, rate) for rate in rates[i]]
            self.layers.append(Stage(blocks, nn.Identity() if i == len(dims) - 1 else downsample(dim, dims[i + 1])))

    def _build_classifier(self, drop_rate: float, norm_eps: float = 1e-5) -> None:
        """``classifier`` (final LayerNorm + linear head) and the dropout before the head."""
        head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.classifier = nn.ModuleDict({"norm": nn.LayerNorm(self.num_features, eps=norm_eps), "head": head})
        self.head_drop = nn.Dropout(drop_rate)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init of both families: trunc-normal(0.02) Linear weights with zero bias;
        the SSMs' own parameters (not Linear modules) keep their Mamba init; convs keep PyTorch's."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond what timm skips anyway (every 1-D tensor: norms, biases, ``Ds``): the
        official optimizers decay the 2-D ``A_logs`` / ``x_proj`` / ``dt_projs`` too, and the
        published numbers were trained that way."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer-decay groups: stem, each block (or each stage), its downsampling after it, final norm."""
        if coarse:
            blocks: Any = r"^layers\.(\d+)"
        else:
            blocks = [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),
                (r"^classifier\.norm", (99999,)),
            ]
        return dict(stem=r"^patch_embed", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier["head"]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, features out), on the model's device and dtype."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed[0].weight
        head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else None
        self.classifier["head"] = head or nn.Identity()

    def __prepare_scriptable__(self) -> nn.Module:
        raise TorchScriptUnsupported(type(self).__name__)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> last-stage features (B, H/32, W/32, C), channels-last."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps (after each stage's blocks, before its downsampling; strides
        4, 8, 16, 32) for the stages in ``indices`` (last n if int, all if None), NCHW or NHWC.
        ``norm`` applies the classifier's norm to the last stage's map (timm's convention)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        intermediates, last = [], len(self.layers) - 1
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers[: max_index + 1] if stop_early else self.layers):
            x = stage.run_blocks(x)
            if i in take:
                y = self.classifier["norm"](x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
            x = stage.downsample(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index taken (and the final norm / head if asked)."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_norm:
            self.classifier["norm"] = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.classifier["norm"](x)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.classifier["head"](x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
