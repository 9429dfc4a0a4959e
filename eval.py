"""Evaluate a checkpoint: python eval.py checkpoint=PATH output=FILE.json [overrides] (also under torchrun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from shufflemamba.config import register_resolvers
from shufflemamba.errors import UserError

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from shufflemamba.engine.evaluator import run_eval

    try:
        return run_eval(cfg)["top1"]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
