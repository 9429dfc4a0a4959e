"""Config helpers shared by train.py and eval.py: Hydra resolvers, the check of every
fixed-choice key, and the model config -> ``timm.create_model`` arguments.

Every key that takes one of a fixed set of values is checked once, at start-up, before
anything is built or read (:func:`validate`): a wrong value is one line naming the key, the
value and the valid choices, never a silently ignored setting.
"""

from __future__ import annotations

import datetime
import inspect
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf
from timm.optim import list_optimizers
from timm.scheduler import create_scheduler_v2

from .data.datasets import DATA_KINDS
from .errors import UserError
from .models import supports_token_shuffle
from .ops import BACKENDS

# timm schedulers that can be stepped per optimizer update (plateau steps on epoch metrics).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.scan_backend": BACKENDS,
    "data.kind": DATA_KINDS,
    "data.interpolation": INTERPOLATIONS,
    "aug.interpolation": INTERPOLATIONS,
    "aug.remode": ("pixel", "rand", "const"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "sched.name": SCHEDULERS,
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "bf16", "fp16", "fp32"),
    "trainer.best_by": ("ema", "raw"),
    "eval.device": ("auto", "cpu", "cuda"),
    "eval.precision": ("auto", "bf16", "fp16", "fp32"),
    "logger.kind": ("none", "wandb"),
    "logger.mode": ("online", "offline", "disabled"),
}
# Keys of a model config that are framework settings, not constructor arguments.
_NOT_CONSTRUCTOR_ARGS = ("name", "crop_pct")


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


def _choice_error(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> UserError:
    shown = ", ".join(choices) if len(choices) <= 12 else ", ".join(choices[:12]) + f", ... ({len(choices)} in all)"
    return UserError(f"{key}={value!r} is not a valid choice; use one of: {shown}")


def validate(cfg: DictConfig) -> None:
    """Check every fixed-choice key present in ``cfg`` (and the scheduler's and optimizer's
    names and keys) before anything is built; raises one :class:`UserError` line."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise _choice_error(key, value, choices)
    optimizer = OmegaConf.select(cfg, "optim.name", default=None)
    if optimizer is not None and optimizer not in list_optimizers():
        raise _choice_error("optim.name", optimizer, list_optimizers())
    sched = OmegaConf.select(cfg, "sched", default=None)
    if sched is not None:
        accepted = set(inspect.signature(create_scheduler_v2).parameters) - {"optimizer", "sched", "num_epochs"}
        unknown = sorted(set(sched) - accepted - {"name"})
        if unknown:
            raise UserError(
                f"sched.{unknown[0]} is not a setting of timm's {sched.name!r} scheduler factory "
                f"(create_scheduler_v2); its settings: {', '.join(sorted(accepted - {'updates_per_epoch'}))}"
            )


def model_kwargs(model_cfg: DictConfig | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """model config -> (timm name, create_model kwargs without the nulls).

    A null key means "the registered default" (for our families, the size tables in
    :mod:`shufflemamba.models`), so it is not passed. The token-shuffle keys are dropped for
    families where the shuffle is undefined; asking for a shuffle there (``shuffle_rate > 0``)
    is a :class:`UserError`, never a silent no-op.
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
