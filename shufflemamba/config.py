"""The Hydra side of the configs: the ``${run_stamp:}`` resolver and the resolved-config dump.

Light on purpose (omegaconf only): train.py and eval.py register the resolver before Hydra
parses the command line, so ``--help`` and a mistyped key answer without importing torch, timm
or the models. Which values a key may take is checked by :mod:`shufflemamba.engine.choices`;
a model config becomes ``timm.create_model`` arguments in :mod:`shufflemamba.models.from_config`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


def run_stamp() -> str:
    """A run-directory name that every rank and every torchrun restart agrees on.

    Explicit ``SHUFFLEMAMBA_RUN_STAMP`` wins; under torchrun the rendezvous run id is shared by
    all ranks and kept across ``--max-restarts`` restarts (so ``checkpoint.resume=auto`` finds
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
