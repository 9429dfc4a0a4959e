"""Config helpers shared by train.py and eval.py: Hydra resolvers and the user-error type."""

from __future__ import annotations

import datetime
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .models import supports_token_shuffle


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback."""


def run_stamp() -> str:
    """A run-directory name that every rank and every torchrun restart agrees on.

    Explicit ``SHUFFLEMAMBA_RUN_STAMP`` wins; under torchrun the rendezvous run id is shared by
    all ranks and kept across ``--max-restarts`` restarts (so ``trainer.resume=auto`` finds
    last.pt); otherwise the local time. For real runs, set ``hydra.run.dir`` yourself.
    """
    if os.environ.get("SHUFFLEMAMBA_RUN_STAMP"):
        return os.environ["SHUFFLEMAMBA_RUN_STAMP"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (checkpoints, wandb, config.yaml)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


# Keys of a model config that are framework settings, not constructor arguments.
_NOT_CONSTRUCTOR_ARGS = ("name", "crop_pct")


def model_kwargs(model_cfg: DictConfig | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """model config -> (timm name, create_model kwargs without the nulls).

    The token-shuffle keys are dropped for families where the shuffle is undefined; asking
    for a shuffle there (``shuffle_rate > 0``) is a :class:`UserError`, never a silent no-op.
    """
    items = dict(model_cfg) if isinstance(model_cfg, dict) else OmegaConf.to_container(model_cfg, resolve=True)
    name = items["name"]
    kwargs = {k: v for k, v in items.items() if v is not None and k not in _NOT_CONSTRUCTOR_ARGS}
    if not supports_token_shuffle(name):
        rate = kwargs.pop("shuffle_rate", 0.0)
        kwargs.pop("shuffle_per_sample", None)
        if rate:
            raise UserError(
                f"model.shuffle_rate={rate}, but the layer-wise token shuffle is only defined for the plain "
                f"sequence models (vim_*, shufflemamba_*), not for {name}; set model.shuffle_rate=0"
            )
    return name, kwargs
