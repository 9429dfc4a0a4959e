"""Where numbers go: the log, metrics.jsonl (every row carries world_size), and wandb."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("shufflemamba")

LOGGER_KINDS = ("none", "wandb")
LOGGER_MODES = ("online", "offline", "disabled")  # wandb's


_OUR_HANDLERS: list[logging.Handler] = []


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Rank 0 logs INFO to the console and ``train.log``; other ranks only warnings. Replaces
    the handlers a previous call installed and leaves everyone else's (a host program's, pytest's)."""
    root = logging.getLogger()
    while _OUR_HANDLERS:
        handler = _OUR_HANDLERS.pop()
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    _OUR_HANDLERS.append(console)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        _OUR_HANDLERS.append(file_handler)
    for handler in _OUR_HANDLERS:
        root.addHandler(handler)


class MetricsWriter:
    """Appends JSON rows to ``metrics.jsonl`` (rank 0 only) and forwards them to wandb."""

    def __init__(self, run_dir: Path, world_size: int, enabled: bool, wandb_run: Any = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.world_size, self.enabled, self.wandb_run = world_size, enabled, wandb_run

    def write(self, row: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {**row, "world_size": self.world_size}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            split = row.get("split", "train")
            skip = ("split", "world_size", "epoch", "step")
            data = {f"{split}/{k}": v for k, v in row.items() if k not in skip and isinstance(v, (int, float))}
            data["epoch"] = row.get("epoch")
            self.wandb_run.log(data, step=step)


def start_wandb(logger_cfg: Any, run_dir: Path, config: dict[str, Any], run_id: str | None):
    """Start (or resume, with ``run_id``) a wandb run; None when the logger is off."""
    if logger_cfg.kind != "wandb" or logger_cfg.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        name=logger_cfg.name,
        group=logger_cfg.get("group"),
        tags=list(logger_cfg.get("tags") or []),
        mode=logger_cfg.mode,
        dir=str(run_dir),
        config=config,
        id=run_id,
        resume="allow" if run_id else None,
    )


def upload_artifact(wandb_run: Any, path: Path, name: str) -> None:
    import wandb

    artifact = wandb.Artifact(name, type="model")
    artifact.add_file(str(path))
    wandb_run.log_artifact(artifact)
