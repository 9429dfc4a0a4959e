"""finetune=PATH through train.py: a new run from our checkpoints and official files, another
class count and resolution, a pre-empted fine-tune resuming itself, and its errors."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, read_metrics, run_script, start_run, wait_for_checkpoints
from PIL import Image

FAST = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny demo run to fine-tune from (its best.pt was chosen by the EMA weights)."""
    run_dir = tmp_path_factory.mktemp("source")
    run_script("train.py", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def _val(run_dir: Path, epoch: int) -> dict[str, float]:
    return {r["weights"]: r["top1"] for r in read_metrics(run_dir) if r["split"] == "val" and r["epoch"] == epoch}


def test_a_finetune_is_a_new_run_that_starts_from_what_the_checkpoint_knew(source, tmp_path):
    run_dir = tmp_path / "ft"
    best = source / "checkpoints" / "best.pt"
    # lr ~0: the first evaluation sees the loaded weights themselves
    proc = run_script(
        "train.py", *TINY, *FAST, "optim.base_lr=1e-12", "sched.warmup_lr=1e-12", "sched.min_lr=1e-12",
        f"finetune={best}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert f"fine-tuning from {best}: EMA weights" in proc.stderr
    ckpt = torch.load(best, weights_only=True)
    recorded = max(r["top1"] for r in read_metrics(source) if r["split"] == "val" and r["weights"] == "ema")
    assert recorded == pytest.approx(ckpt["progress"]["best_top1"])
    assert _val(run_dir, 0)["raw"] == pytest.approx(recorded)  # raw model of the new run = the EMA it loaded
    own = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (own["epoch"], own["global_step"]) == (1, 2)  # its own counters, from 0

    # another resolution: the position embedding follows the grid, the run trains
    proc = run_script(
        "train.py", *TINY, *FAST, "data.img_size=48", f"finetune={best}", f"hydra.run.dir={tmp_path / 'r48'}"
    )
    assert "position embedding resized (1, 17, 32) -> (1, 37, 32)" in proc.stderr


def _image_folder(root: Path, classes: int = 3, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class cue the model can learn
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_a_three_class_folder_fine_tunes_an_official_format_file_with_a_new_head(tmp_path):
    root = tmp_path / "data"
    _image_folder(root)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2)
    args = argparse.Namespace(model="vim_tiny_patch16_224", nb_classes=1000)
    official = tmp_path / "vim_t_official.pth"
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "args": args, "epoch": 299}, official)
    run_dir = tmp_path / "ft"
    overrides = [
        "model=vim_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
        "data=imagenet", f"data.root={root}", "data.num_classes=3", "data.img_size=32", "data.batch_size=12",
        "data.num_workers=0", f"+data.index_cache_dir={tmp_path / 'cache'}", "aug=none", "trainer.epochs=2",
        "trainer.device=cpu", "trainer.progress_bar=false", "finetune_ema=false",
    ]  # fmt: skip
    proc = run_script("train.py", *overrides, f"finetune={official}", f"hydra.run.dir={run_dir}")
    assert "raw weights" in proc.stderr
    assert "classifier re-initialised for another class count (head.weight (1000, 32) -> (3, 32)" in proc.stderr
    losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert losses and all(np.isfinite(losses))
    trained = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert trained["head.weight"].shape == (3, 32)


def test_a_preempted_finetune_resumes_itself_and_ends_as_an_uninterrupted_one(source, tmp_path):
    common = [
        *TINY, "trainer.epochs=2", "trainer.deterministic=true", "trainer.checkpoint_every_steps=1",
        f"finetune={source / 'checkpoints' / 'best.pt'}",
    ]  # fmt: skip
    reference, run_dir = tmp_path / "reference", tmp_path / "preempted"
    run_script("train.py", *common, f"hydra.run.dir={reference}")
    proc = start_run(common, run_dir)
    assert wait_for_checkpoints(proc, run_dir) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143  # pre-empted: a checkpoint, then exit
    resumed = run_script("train.py", *common, f"hydra.run.dir={run_dir}")  # the same command again
    last = run_dir / "checkpoints" / "last.pt"
    assert "not loaded, the run resumes from its own checkpoint" in resumed.stderr and "resumed from" in resumed.stderr
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_finetune_errors_are_one_line(source, tmp_path):
    def error(*extra: str) -> str:
        proc = run_script("train.py", *TINY, *extra, f"hydra.run.dir={tmp_path / 'e'}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    assert "finetune: checkpoint not found: /no/such.pt" in error("finetune=/no/such.pt")
    assert "this preset fine-tunes a checkpoint; pass finetune=PATH" in error("finetune_required=true")
    wrong = error(f"finetune={source / 'checkpoints' / 'best.pt'}", "model.embed_dim=48")
    assert "checkpoint does not match the model" in wrong or "mis-shaped" in wrong
