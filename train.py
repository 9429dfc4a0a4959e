"""Train a Vision Mamba / ShuffleMamba model: python train.py [overrides] (also under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from shufflemamba.config import register_resolvers
from shufflemamba.errors import NonFiniteLossError, StopRequested, UserError

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from shufflemamba.engine.trainer import run_training

    try:
        result = run_training(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (UserError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(143)
    return result.get("best_top1", 0.0)  # for Hydra sweepers


if __name__ == "__main__":
    main()
