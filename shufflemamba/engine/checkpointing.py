"""Checkpoint policy, in one place: the run's checkpoint folder, when to write, which file a run
starts from (its own last.pt, a fine-tuning source, nothing), which weights pick best.pt, and
how many checkpoints are kept (torchtitan's ``CheckpointManager``, timm's ``CheckpointSaver``).

The trainer asks ("start the weights", "resume", "is a checkpoint due", "save"); it never
builds a path. The file format and safe reading live in :mod:`shufflemamba.checkpoint`.
Settings: the ``checkpoint:`` section of the config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from ..checkpoint import TrainingState, load_for_finetune, save_atomic
from ..errors import CheckpointError, CheckpointWriteError, UserError
from . import distributed as D

log = logging.getLogger("shufflemamba")

BEST_BY = ("ema", "raw")


class CheckpointManager:
    """One run's checkpoints under ``run_dir/checkpoints``: ``last.pt`` (what ``resume=auto``
    continues from), ``best.pt`` (by val top-1 of ``best_by``'s weights) and, with
    ``keep_last = k > 1``, the k newest as ``update-<N>.pt`` (hard links: no extra disk)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dist: D.DistInfo, config: dict[str, Any]) -> None:
        self.cfg, self.dist, self.config = cfg, dist, config
        self.folder = run_dir / "checkpoints"
        self.last, self.best = self.folder / "last.pt", self.folder / "best.pt"
        if int(cfg.keep_last) < 1:
            raise UserError(f"checkpoint.keep_last={cfg.keep_last}: keep at least 1 (last.pt)")
        self.written: int | None = None  # the update of the last checkpoint this run wrote

    # ---- where a run starts -----------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """The checkpoint this run continues from: ``checkpoint.resume`` (auto: last.pt, if any)."""
        resume = self.cfg.resume
        if resume in (None, "", "null", False):
            return None
        path = self.last if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume != "auto":
                raise UserError(f"checkpoint.resume: checkpoint not found: {path}")
            return None
        return path

    def start_weights(self, model: nn.Module) -> nn.Module:
        """``checkpoint.finetune``: a new run from those weights (optimizer, schedule and epoch
        start afresh). A run that has its own checkpoint resumes it instead, so a pre-empted
        fine-tune continues where it stopped. Returns the model, now holding its start weights:
        build the EMA from it."""
        source = self.cfg.finetune
        if not source:
            return model
        if self.resume_path() is not None:
            log.info("checkpoint.finetune=%s: not loaded, the run resumes from its own checkpoint", source)
            return model
        if not Path(source).is_file():
            raise UserError(f"checkpoint.finetune: checkpoint not found: {source}")
        try:
            notes = load_for_finetune(model, source, self.cfg.finetune_ema)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint.finetune={source}: {exc}") from None
        log.info("fine-tuning from %s: %s", source, "; ".join(notes))
        return model

    def resume(self, state: TrainingState, progress: Any, global_batch: int) -> bool:
        """Restore every component of ``state`` from the resume checkpoint, if there is one.

        The global batch is part of the recipe (the order of samples is cut in global batches):
        another one is refused unless ``checkpoint.allow_global_batch_change``, then the epoch
        continues at the same sample with the new one.
        """
        path = self.resume_path()
        if path is None:
            return False
        state.load(path)
        if progress.global_batch != global_batch:
            if not self.cfg.allow_global_batch_change:
                raise UserError(
                    f"{path} was trained with a global batch of {progress.global_batch}, this run has {global_batch} "
                    f"(data.batch_size x world size x accumulation): keep trainer.global_batch={progress.global_batch}"
                    f", or set checkpoint.allow_global_batch_change=true to continue with the new one"
                )
            log.warning(
                "global batch %d -> %d: the epoch continues at sample %d",
                progress.global_batch,
                global_batch,
                progress.sample_in_epoch,
            )
            progress.global_batch = global_batch
        self.written = progress.global_step
        log.info(
            "resumed from %s: epoch %d, sample %d, update %d (world size %d)",
            path,
            progress.epoch,
            progress.sample_in_epoch,
            progress.global_step,
            self.dist.world_size,
        )
        return True

    # ---- what a run keeps ---------------------------------------------------------------------
    def best_source(self, has_ema: bool) -> str:
        """Which weights' val top-1 picks best.pt (and which eval.py scores by default)."""
        return "ema" if (self.cfg.best_by == "ema" and has_ema) else "raw"

    def due(self, global_step: int) -> bool:
        """A mid-epoch checkpoint after this update (``checkpoint.every_steps``)."""
        every = int(self.cfg.every_steps)
        return bool(every) and global_step % every == 0

    def save(self, state: TrainingState, global_step: int, best_weights: str, best: bool = False) -> None:
        """last.pt (and best.pt, and the kept history) at this point of the run. A collective:
        every rank calls it (the RNG state is gathered), rank 0 writes. A failed write stops every
        rank together with one line naming the file, the cause and the checkpoint that is intact."""
        error = None
        payload = state.state_dict(best_weights=best_weights, config=self.config)
        if self.dist.is_main:
            try:
                self._write(payload, global_step, best)
            except CheckpointWriteError as exc:
                error = str(exc)
        if D.any_rank([error is not None], self.dist.device)[0]:
            raise CheckpointWriteError(f"{error or 'rank 0 could not write the checkpoint'}; {self._intact()}")
        self.written = global_step  # (the agreement above is also the barrier: no rank runs ahead of the write)

    def _write(self, payload: dict[str, Any], global_step: int, best: bool) -> None:
        save_atomic(payload, self.last)
        if best:
            _link_or_copy(self.last, self.best)
        keep = int(self.cfg.keep_last)
        if keep > 1:
            _link_or_copy(self.last, self.folder / f"update-{global_step:08d}.pt")
            history = sorted(self.folder.glob("update-*.pt"))
            for old in history[: max(0, len(history) - keep)]:
                old.unlink()

    def _intact(self) -> str:
        if self.written is not None and self.last.is_file():
            return f"{self.last} is intact (update {self.written}): free space or fix the folder, then rerun to resume"
        return "no checkpoint of this run was written yet"


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (a hard link where the filesystem allows), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write {dst}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
