"""A model config (``conf/model/*.yaml``) -> ``timm.create_model`` arguments."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from . import supports_token_shuffle


def model_kwargs(model_cfg: DictConfig | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """model config -> (timm name, create_model kwargs without the nulls).

    A null key means "the registered default" (for our families, the size tables in
    :mod:`shufflemamba.models`), so it is not passed. Asking a family without the layer-wise token
    shuffle for one (``+model.shuffle_rate=0.5``) is a :class:`UserError`, never a silent no-op;
    a rate of 0 there is simply not passed on.
    """
    items = dict(model_cfg) if isinstance(model_cfg, dict) else OmegaConf.to_container(model_cfg, resolve=True)
    name = items.pop("name")
    items.pop("layer_shuffle", None)  # not a constructor argument: build_model attaches it (models/layer_shuffle.py)
    kwargs = {k: v for k, v in items.items() if v is not None}
    if not supports_token_shuffle(name):
        rate = kwargs.pop("shuffle_rate", 0.0)
        kwargs.pop("shuffle_per_sample", None)
        if rate:
            raise UserError(
                f"model.shuffle_rate={rate}, but the layer-wise token shuffle is only defined for the plain "
                f"sequence models (vim_*, shufflemamba_*), not for {name}; leave it unset"
            )
    return name, kwargs
