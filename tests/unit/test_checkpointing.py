"""The checkpoint manager, in-process: where a run starts (its own last.pt before a fine-tuning
source, which weights a fine-tune takes, another class count and grid), what it keeps, and a
failed write that says in one line what is intact."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, compose_cfg, read_metrics, write_image_folder

from shufflemamba.engine.trainer import Trainer, run_training
from shufflemamba.errors import CheckpointWriteError, StopRequested, UserError

FAST = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2"]


def _train(run_dir, *overrides):
    return run_training(compose_cfg("train", [*TINY, *overrides]), run_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny demo run to fine-tune from (its best.pt was chosen by the EMA weights)."""
    run_dir = tmp_path_factory.mktemp("source")
    _train(run_dir)
    return run_dir


def _val(run_dir, epoch: int) -> dict[str, float]:
    return {r["weights"]: r["top1"] for r in read_metrics(run_dir) if r["split"] == "val" and r["epoch"] == epoch}


def test_a_finetune_is_a_new_run_that_starts_from_what_the_checkpoint_knew(source, tmp_path, caplog):
    best = source / "checkpoints" / "best.pt"
    run_dir = tmp_path / "ft"
    # lr ~0: the first evaluation sees the loaded weights themselves
    _train(run_dir, *FAST, "optim.base_lr=1e-12", "sched.warmup_lr=1e-12", "sched.min_lr=1e-12",
           f"checkpoint.finetune={best}")  # fmt: skip
    assert f"fine-tuning from {best}: EMA weights" in caplog.text
    recorded = torch.load(best, weights_only=True)["progress"]["best_top1"]
    assert _val(run_dir, 0)["raw"] == pytest.approx(recorded)  # raw model of the new run = the EMA it loaded
    own = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (own["epoch"], own["global_step"]) == (1, 2)  # its own counters, from 0


def test_a_three_class_folder_fine_tunes_an_official_format_file_with_a_new_head(tmp_path, caplog):
    root = write_image_folder(tmp_path / "data", {"train": 36, "val": 12}, num_classes=3)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2)
    args = argparse.Namespace(model="vim_tiny_patch16_224", nb_classes=1000)
    official = tmp_path / "vim_t_official.pth"
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "args": args, "epoch": 299}, official)
    run_dir = tmp_path / "ft"
    run_training(compose_cfg("train", [
        "model=vim_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
        "data=imagenet", f"data.root={root}", "data.num_classes=3", "data.img_size=32", "data.batch_size=12",
        "data.num_workers=0", f"data.index_cache_dir={tmp_path / 'cache'}", "aug=none", "trainer.epochs=2",
        "trainer.device=cpu", "trainer.progress_bar=false", "checkpoint.finetune_ema=false",
        f"checkpoint.finetune={official}",
    ]), run_dir)  # fmt: skip
    assert "raw weights" in caplog.text
    assert "classifier re-initialised for another class count (head.weight (1000, 32) -> (3, 32)" in caplog.text
    losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert losses and all(np.isfinite(losses))
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]["head.weight"].shape == (3, 32)


def test_a_stopped_finetune_resumes_itself_and_ends_as_an_uninterrupted_one(source, tmp_path, caplog, monkeypatch):
    """Pre-empted mid-epoch (a stop request, as SIGTERM makes one), then the same command again:
    the run's own last.pt wins over checkpoint.finetune, and it ends where an uninterrupted run does."""
    common = ["trainer.epochs=2", "trainer.deterministic=true",
              f"checkpoint.finetune={source / 'checkpoints' / 'best.pt'}"]  # fmt: skip
    reference, run_dir = tmp_path / "reference", tmp_path / "stopped"
    _train(reference, *common)
    update = Trainer.update

    def stop_at_update_3(self, *args):
        self.stop_requested = self.progress.global_step == 3
        return update(self, *args)

    monkeypatch.setattr(Trainer, "update", stop_at_update_3)
    with pytest.raises(StopRequested, match="checkpoint written at epoch 0"):
        _train(run_dir, *common)
    monkeypatch.setattr(Trainer, "update", update)
    caplog.clear()
    _train(run_dir, *common)
    assert "not loaded, the run resumes from its own checkpoint" in caplog.text and "resumed from" in caplog.text
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def _trainer(tmp_path, *overrides):
    return Trainer(compose_cfg("train", [*TINY, *overrides]), tmp_path / "run")


def test_a_failed_checkpoint_write_is_one_line_and_the_last_checkpoint_stays_whole(tmp_path):
    trainer = _trainer(tmp_path)
    try:
        trainer.save_checkpoint()
        last = trainer.checkpoints.last
        before = last.read_bytes()
        # the kernel's own "disk full": the temporary file the next save opens is /dev/full
        (last.parent / f".last.pt.tmp{os.getpid()}").symlink_to("/dev/full")
        trainer.progress.global_step = 7
        with pytest.raises(CheckpointWriteError) as error:
            trainer.save_checkpoint()
        message = str(error.value)
        assert message.startswith(f"cannot write {last}: ") and "No space left on device" in message
        assert f"{last} is intact (update 0)" in message and "\n" not in message
        assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    finally:
        trainer.close()


def test_keep_last_keeps_the_newest_updates_and_best_stays_the_file_it_was(tmp_path):
    trainer = _trainer(tmp_path, "checkpoint.keep_last=2")
    try:
        for step in (1, 2, 3):
            trainer.progress.global_step = step
            trainer.save_checkpoint(best=step == 2)
        folder = trainer.checkpoints.folder
        assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "update-00000002.pt",
                                                             "update-00000003.pt"]  # fmt: skip
        progress = {p.name: torch.load(p, weights_only=True)["progress"]["global_step"] for p in folder.iterdir()}
        assert progress == {"best.pt": 2, "last.pt": 3, "update-00000002.pt": 2, "update-00000003.pt": 3}
    finally:
        trainer.close()
    with pytest.raises(UserError, match="checkpoint.keep_last=0: keep at least 1"):
        _trainer(tmp_path, "checkpoint.keep_last=0")


def test_resuming_with_another_global_batch_is_refused_unless_allowed(tmp_path):
    """The global batch cuts the epoch's order: a run continues only with its own, or when asked."""
    trainer = _trainer(tmp_path, "data.batch_size=16", "trainer.global_batch=64")
    trainer.save_checkpoint()
    trainer.close()
    with pytest.raises(UserError, match="trained with a global batch of 64, this run has 32 .* keep trainer.global_ba"):
        _trainer(tmp_path, "data.batch_size=16", "trainer.global_batch=32")
    resumed = _trainer(tmp_path, "data.batch_size=16", "trainer.global_batch=32",
                       "checkpoint.allow_global_batch_change=true")  # fmt: skip
    assert resumed.progress.global_batch == 32
    resumed.close()
