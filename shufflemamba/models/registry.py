"""Registering a family's sizes with timm, so ``timm.create_model(name)`` builds them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from timm.models import register_model
from torch import nn


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


def register_sizes(
    module_name: str,
    sizes: Mapping[str, Any],
    create: Callable[..., nn.Module],
    fields: str,
) -> None:
    """One timm entry point per size: ``name(pretrained=False, **kwargs) -> create(name, ...)``.

    The entry points are set as attributes of ``module_name`` (timm records the module to
    list models by family); ``fields`` names the entries of each size tuple, for the docstring.
    """
    module = sys.modules[module_name]
    for variant in sizes:

        def factory(pretrained: bool = False, _variant: str = variant, **kwargs: Any) -> nn.Module:
            return create(_variant, pretrained, **kwargs)

        factory.__name__ = factory.__qualname__ = variant
        factory.__doc__ = f"{variant}: {fields} = {sizes[variant]}"
        factory.__module__ = module_name
        setattr(module, variant, register_model(factory))
