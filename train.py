"""Train a Vision Mamba / ShuffleMamba model: python train.py [overrides] (also under torchrun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


def _run_stamp() -> str:
    # Imported when Hydra first resolves the run dir, not before it has parsed the command line:
    # `--help` and a mistyped key answer without loading torch, timm and the models.
    from shufflemamba.config import run_stamp

    return run_stamp()


OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from shufflemamba.engine.trainer import run_training
    from shufflemamba.errors import NonFiniteLossError, StopRequested, UserError

    try:
        result = run_training(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (UserError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    return result.get("best_top1", 0.0)  # for Hydra sweepers


if __name__ == "__main__":
    main()
