"""Registering a family's sizes with timm, so ``timm.create_model(name)`` builds them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from timm.models import register_model
from torch import nn


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
