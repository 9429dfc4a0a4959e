"""Helpers to run train.py / eval.py as a user would: real subprocesses, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from shufflemamba.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]

# A tiny ShuffleMamba on the embedded digits: seconds per run on 2 CPU cores.
TINY = [
    "experiment=demo",
    "model.embed_dim=32",
    "model.depth=2",
    "data.batch_size=32",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=5",
    "trainer.progress_bar=false",
]


def compose_cfg(name: str, overrides: list[str]):
    """The config train.py / eval.py would see for these command-line overrides."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("SHUFFLEMAMBA_SCAN_BACKEND", None)
    return env


def run_script(
    script: str,
    *overrides: str,
    torchrun: int | None = None,
    check: bool = True,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            script,
            *overrides,
        ]
    else:
        cmd = [sys.executable, script, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def evaluate_checkpoint(overrides: list[str], checkpoint: Path, work_dir: Path) -> dict:
    """Run eval.py on ``checkpoint`` with these config overrides; its JSON result."""
    out = work_dir / "eval.json"
    run_script("eval.py", *overrides, f"checkpoint={checkpoint}", f"output={out}", f"hydra.run.dir={work_dir / 'eval'}")
    return json.loads(out.read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
