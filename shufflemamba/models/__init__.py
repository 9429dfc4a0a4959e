"""Model families. Importing this registers every size with timm's ``create_model``.

Ours: Vim / ShuffleMamba (:mod:`.vim`), VMamba (:mod:`.vmamba`) and MSVMamba (:mod:`.msvmamba`). MambaOut and DeiT are
timm's own implementations, used as they are.
"""

from collections.abc import Callable
from typing import Any

from timm.models import mambaout, vision_transformer
from torch import nn

from . import msvmamba, vim, vim_reg, vmamba
from .msvmamba import MSVMAMBA_SIZES, MSVMamba
from .shuffle import LayerwiseShuffle
from .vim import VIM_SIZES, BiMambaMixer, MambaBlock, VisionMamba, checkpoint_filter_fn, resize_pos_embed
from .vim_reg import REG_SIZES, VisionMambaReg
from .vmamba import SS2D, VMAMBA_SIZES, VMamba, VSSBlock

# Each family's converter from foreign checkpoints (official names and layouts, another grid's
# position embedding) to its own state dict: the functions its factories also pass to timm's
# build_model_with_cfg(pretrained_filter_fn=...). Most specific class first.
CHECKPOINT_FILTERS: list[tuple[type, Callable[[dict[str, Any], Any], dict[str, Any]]]] = [
    (VisionMambaReg, vim_reg.checkpoint_filter_fn),
    (VisionMamba, vim.checkpoint_filter_fn),
    (VMamba, vmamba.checkpoint_filter_fn),
    (MSVMamba, msvmamba.checkpoint_filter_fn),
    (mambaout.MambaOut, mambaout.checkpoint_filter_fn),
    (vision_transformer.VisionTransformer, vision_transformer.checkpoint_filter_fn),
]


def checkpoint_filter(model: nn.Module) -> Callable[[dict[str, Any], Any], dict[str, Any]] | None:
    """The converter of ``model``'s family, or None for a family that loads its own names only."""
    return next((convert for cls, convert in CHECKPOINT_FILTERS if isinstance(model, cls)), None)


def supports_token_shuffle(model_name: str) -> bool:
    """The layer-wise token shuffle is defined for plain sequence models (Vim / ShuffleMamba):
    a token order to permute and restore around each block. Hierarchical 2-D models
    (VMamba, MambaOut) and timm's ViTs have no such hook."""
    return model_name in VIM_SIZES or model_name in REG_SIZES


__all__ = [
    "MSVMAMBA_SIZES",
    "MSVMamba",
    "REG_SIZES",
    "SS2D",
    "VIM_SIZES",
    "VMAMBA_SIZES",
    "BiMambaMixer",
    "LayerwiseShuffle",
    "MambaBlock",
    "VMamba",
    "VSSBlock",
    "VisionMamba",
    "VisionMambaReg",
    "checkpoint_filter",
    "checkpoint_filter_fn",
    "resize_pos_embed",
    "supports_token_shuffle",
]
