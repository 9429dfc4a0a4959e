"""Model families. Importing this registers every size with timm's ``create_model``.

Ours: Vim / ShuffleMamba (:mod:`.vim`) and VMamba (:mod:`.vmamba`). MambaOut and DeiT are
timm's own implementations, used as they are.
"""

from .shuffle import LayerwiseShuffle
from .vim import VIM_SIZES, BiMambaMixer, MambaBlock, VisionMamba, checkpoint_filter_fn, resize_pos_embed
from .vim_reg import REG_SIZES, VisionMambaReg
from .vmamba import SS2D, VMAMBA_SIZES, VMamba, VSSBlock


def supports_token_shuffle(model_name: str) -> bool:
    """The layer-wise token shuffle is defined for plain sequence models (Vim / ShuffleMamba):
    a token order to permute and restore around each block. Hierarchical 2-D models
    (VMamba, MambaOut) and timm's ViTs have no such hook."""
    return model_name in VIM_SIZES or model_name in REG_SIZES


__all__ = [
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
    "checkpoint_filter_fn",
    "resize_pos_embed",
    "supports_token_shuffle",
]
