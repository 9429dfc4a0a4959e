"""Model families. Importing this registers every size with timm's ``create_model``."""

from .vim import MODEL_SIZES, BiMambaMixer, MambaBlock, VisionMamba, checkpoint_filter_fn, resize_pos_embed

__all__ = [
    "MODEL_SIZES",
    "BiMambaMixer",
    "MambaBlock",
    "VisionMamba",
    "checkpoint_filter_fn",
    "resize_pos_embed",
]
