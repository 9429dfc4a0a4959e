"""The check of every config key that takes one of a fixed set of values, before anything is
built or read: a wrong value is one line naming the key, the value and the valid choices, never
a silently ignored setting. Each list of choices comes from the module that acts on the key.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf
from timm.optim import list_optimizers
from timm.scheduler import create_scheduler_v2

from ..data.datasets import DATA_KINDS
from ..data.loader import ERASE_MODES, MIXUP_MODES
from ..data.transforms import INTERPOLATIONS
from ..errors import UserError
from ..models.layer_shuffle import LAYER_ORDERS, LAYER_SHUFFLE_MODES
from ..ops import BACKENDS
from .builders import PRECISIONS, SCHEDULERS
from .checkpointing import BEST_BY
from .distributed import DEVICES
from .tracking import LOGGER_KINDS, LOGGER_MODES

CHOICES: dict[str, tuple[str, ...]] = {
    "model.scan_backend": BACKENDS,
    "model.layer_shuffle": LAYER_SHUFFLE_MODES,
    "eval.layer_order": LAYER_ORDERS,
    "data.kind": DATA_KINDS,
    "data.interpolation": INTERPOLATIONS,
    "aug.interpolation": INTERPOLATIONS,
    "aug.remode": ERASE_MODES,
    "aug.mixup_mode": MIXUP_MODES,
    "sched.name": SCHEDULERS,
    "trainer.device": DEVICES,
    "trainer.precision": PRECISIONS,
    "checkpoint.best_by": BEST_BY,
    "eval.device": DEVICES,
    "eval.precision": PRECISIONS,
    "logger.kind": LOGGER_KINDS,
    "logger.mode": LOGGER_MODES,
}


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
