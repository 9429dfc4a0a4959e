"""Pre-emption on a real SLURM (a one-node cluster on localhost, scripts/slurm_local.sh): the
time-limit warning checkpoints, the job requeues itself and ends bitwise as an uninterrupted run;
a cancellation does not requeue; the requeue guard holds. Runs where `sbatch` and root are
available (CI installs Debian's slurm packages); skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, subprocess_env

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("slurmctld") is None, reason="needs SLURM"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM daemons run as root"),
]
# Long enough to be interrupted after its first mid-epoch checkpoint: 4 epochs x 5 updates.
RUN = [*TINY, "trainer.epochs=4", "trainer.deterministic=true", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state)}
    start = subprocess.run(["bash", "scripts/slurm_local.sh", "start"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    if start.returncode != 0:
        pytest.skip(f"the local SLURM did not start: {start.stderr.strip()[-300:]}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", "scripts/slurm_local.sh", "stop"], cwd=ROOT, env=env, timeout=60)


def _submit(slurm, run_dir: Path, *extra_env: str, port: int) -> str:
    env = subprocess_env(**{k: v for k, v in slurm.items() if k.startswith("SLURM_")})
    exports = ",".join(["ALL", f"RUN_DIR={run_dir}", f"MASTER_PORT={port}", *extra_env])
    proc = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--chdir={ROOT}",
         f"--output={run_dir.parent / (run_dir.name + '.out')}", f"--export={exports}", "scripts/slurm_train.sh",
         *RUN],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(slurm, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_for(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _wait_for_checkpoint(slurm, job: str, run_dir: Path) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    _wait_for(lambda: last.exists() or _job(slurm, job)["JobState"] not in ("PENDING", "RUNNING"), what="last.pt")
    assert last.exists(), f"the job ended before its first checkpoint: {_job(slurm, job)['JobState']}"


def _finish(slurm, job: str) -> dict[str, str]:
    """Wait for the job to end (a requeued job starts again after the local cluster's short
    credential expiry, scripts/slurm_local.sh: cred_expire=5 s instead of SLURM's 120)."""
    _wait_for(lambda: _job(slurm, job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), what=job)
    return _job(slurm, job)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "model_ema") for k, v in ckpt[part].items()}


def test_the_time_limit_warning_requeues_and_ends_as_an_uninterrupted_run_and_a_cancellation_does_not(slurm, tmp_path):
    """Three jobs at once (one CPU each): a pre-empted one, a cancelled one, one past its requeue
    guard; and the uninterrupted run beside them."""
    preempted = _submit(slurm, tmp_path / "preempted", port=29711)
    cancelled = _submit(slurm, tmp_path / "cancelled", port=29712)
    reference = subprocess.Popen(
        [sys.executable, "train.py", *RUN, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=ROOT,
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_for_checkpoint(slurm, preempted, tmp_path / "preempted")
    # what --signal=B:USR1@180 does at the time limit: SIGUSR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], env=slurm, check=True)
    _wait_for_checkpoint(slurm, cancelled, tmp_path / "cancelled")
    subprocess.run(["scancel", cancelled], env=slurm, check=True)  # a cancellation: no requeue
    guarded = _submit(slurm, tmp_path / "guarded", "MAX_REQUEUES=0", port=29713)  # past its requeue guard
    _wait_for_checkpoint(slurm, guarded, tmp_path / "guarded")
    subprocess.run(["scancel", "--signal=USR1", "--batch", guarded], env=slurm, check=True)

    info = _finish(slurm, preempted)
    log = (tmp_path / "preempted.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    assert "stop requested (stop file): checkpoint written at epoch" in log and "requeueing job" in log
    assert "resumed from" in log and "done: best val top-1" in log
    assert not (tmp_path / "preempted" / "stop-requested").exists()
    assert reference.wait(timeout=300) == 0
    a = _weights(tmp_path / "reference" / "checkpoints" / "last.pt")
    b = _weights(tmp_path / "preempted" / "checkpoints" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    info = _finish(slurm, cancelled)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")

    info = _finish(slurm, guarded)
    log = (tmp_path / "guarded.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), log[-3000:]
    assert "requeued 0 times already (MAX_REQUEUES=0): not requeueing" in log
