"""Evaluate a checkpoint: python eval.py checkpoint=PATH output=FILE.json [overrides] (also under torchrun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


def _run_stamp() -> str:
    # Imported when Hydra first resolves the run dir (see train.py).
    from shufflemamba.config import run_stamp

    return run_stamp()


OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from shufflemamba.engine.evaluator import run_eval
    from shufflemamba.errors import UserError

    try:
        return run_eval(cfg, command_line=list(HydraConfig.get().overrides.task))["top1"]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
