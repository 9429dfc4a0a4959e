"""The timm ``pretrained_cfg`` our families share: what a weight file expects as input."""

from __future__ import annotations

from typing import Any


def imagenet_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained_cfg for an ImageNet-1k model: 224 input, 0.875 bicubic eval crop, ImageNet
    mean/std, no download URL (weights come from files, see shufflemamba.checkpoint)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        **kwargs,
    }
