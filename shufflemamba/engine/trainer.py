"""The training run: built from the config, it owns the epochs, the step, evaluation and its
checkpoints (torchtitan's Trainer shape; DeiT's main.py + engine.py, made resumable).

Every line of a step is in :meth:`Trainer.train_epoch`: device-side augmentation, autocast,
accumulation, the cross-rank agreement on non-finite losses and stop requests (one collective
and one host sync per update), clipping, the scaler, the optimizer, EMA, the per-update lr,
logging and periodic checkpoints. What a run resumes from is declared once, in
:meth:`Trainer._training_state`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import TrainingState, load_for_finetune
from ..config import to_plain, validate
from ..data.loader import release_workers
from ..errors import CheckpointError, NonFiniteLossError, StopRequested, UserError
from ..ops import describe_scan
from ..rng import capture_rng, keyed_rng, restore_rng, seed_all
from . import distributed as D
from .builders import (
    build_criterion,
    build_ema,
    build_model,
    build_optimizer,
    build_scheduler,
    build_train_data,
    resolve_accumulation,
    resolve_precision,
    scaled_lr,
)
from .evaluator import evaluate
from .tracking import MetricsWriter, setup_logging, start_wandb, upload_artifact

log = logging.getLogger("shufflemamba")


@dataclass
class RunProgress:
    """Where the run is: the counters a resume continues from."""

    epoch: int = 0  # the epoch in progress (or the next one, with sample_in_epoch 0)
    sample_in_epoch: int = 0  # samples of that epoch already trained, all ranks together
    global_step: int = 0  # optimizer updates so far
    global_batch: int = 0  # samples per update the run was trained with
    best_top1: float = -1.0
    best_epoch: int = -1
    nonfinite_steps: int = 0
    wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RankGenerators:
    """Every rank's python / numpy / torch generators (gathered on save: a collective).

    Restored exactly on the same world size; on another, each rank keeps its fresh seeding
    and the mismatch is logged (model-side draws such as drop path restart their streams).
    """

    def __init__(self, dist: D.DistInfo) -> None:
        self.dist = dist

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.dist.world_size, "per_rank": D.gather_objects(capture_rng())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] == self.dist.world_size:
            restore_rng(state["per_rank"][self.dist.rank])
        else:
            log.warning(
                "resuming on %d ranks from a %d-rank run: RNG streams restart",
                self.dist.world_size,
                state["world_size"],
            )


@dataclass
class EpochStats:
    loss: float  # mean finite training loss over the epoch's micro-batches (all ranks)
    images_per_sec: float
    seconds: float
    skipped_images: int
    skipped_batches: int  # micro-batches in which no image could be decoded


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Trainer:
    """One training run on one rank: built from ``cfg``, resumed from ``run_dir``'s last.pt."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        validate(cfg)
        if cfg.get("finetune_required") and not cfg.get("finetune"):
            raise UserError("finetune is not set: this preset fine-tunes a checkpoint; pass finetune=PATH")
        self.cfg, self.run_dir = cfg, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.dist = D.init_distributed(cfg.trainer.device)
        setup_logging(run_dir, self.dist.is_main)
        tcfg = cfg.trainer
        if tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_all(tcfg.seed + self.dist.rank)  # ranks draw independently (drop path, shuffle)
        self.amp_dtype = resolve_precision(tcfg.precision, self.dist.device)
        self.accum_steps = resolve_accumulation(tcfg, cfg.data.batch_size, self.dist.world_size)

        # model first: its config errors surface before any data is read (building the data draws no RNG)
        self.model = build_model(cfg, self.dist.device)
        self._finetune_from(cfg.get("finetune"), cfg.get("finetune_ema"))
        if tcfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.data = build_train_data(cfg, self.dist, self.accum_steps)
        self.criterion = build_criterion(cfg.aug, mixes_labels=self.data.train_transform.mixup is not None)
        self.global_batch = cfg.data.batch_size * self.dist.world_size * self.accum_steps
        self.lr = scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.lr)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, tcfg.epochs, self.data.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(tcfg, self.model)

        self.train_model: Any = self.model
        if self.dist.distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None
            )
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)

        self.progress = RunProgress(global_batch=self.global_batch)
        self.consecutive_nonfinite = 0
        self.stop_requested = False
        self.config_plain = to_plain(cfg)
        self.state = self._training_state()
        self._resume()

        self.wandb = None
        if self.dist.is_main:
            self.wandb = start_wandb(cfg.logger, run_dir, self.config_plain, self.progress.wandb_run_id)
        if self.wandb is not None:
            self.progress.wandb_run_id = self.wandb.id
        self.metrics = MetricsWriter(run_dir, self.dist.world_size, self.dist.is_main, self.wandb)

    # ---- checkpoints ----------------------------------------------------------------------
    def _training_state(self) -> TrainingState:
        """The one declaration of what a checkpoint saves and a resume restores."""
        components: dict[str, Any] = {"model": self.model}
        if self.ema is not None:
            components["model_ema"] = self.ema.module
        components.update(
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            scaler=self.scaler,
            progress=self.progress,
            rng=RankGenerators(self.dist),
        )
        return TrainingState(components)

    def best_source(self) -> str:
        """Which weights' val top-1 picks best.pt (and which eval.py scores by default)."""
        return "ema" if (self.cfg.trainer.best_by == "ema" and self.ema is not None) else "raw"

    def save_checkpoint(self, best: bool = False) -> None:
        """last.pt (and best.pt) at the current progress; a collective: every rank calls it."""
        paths = []
        if self.dist.is_main:
            paths = [self.ckpt_dir / "last.pt"] + ([self.ckpt_dir / "best.pt"] if best else [])
        self.state.save(paths, best_weights=self.best_source(), config=self.config_plain)
        D.barrier()

    def _resume_path(self) -> Path | None:
        """The checkpoint this run continues from: ``trainer.resume`` (auto: last.pt of the run dir)."""
        resume = self.cfg.trainer.resume
        if resume in (None, "", "null", False):
            return None
        path = self.ckpt_dir / "last.pt" if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume != "auto":
                raise UserError(f"trainer.resume: checkpoint not found: {path}")
            return None
        return path

    def _finetune_from(self, source: str | None, use_ema: bool | None) -> None:
        """``finetune=PATH``: a new run starting from those weights (the optimizer, schedule and
        epoch start afresh; EMA starts from them). A run that has its own last.pt resumes it
        instead, so a pre-empted fine-tune continues where it stopped."""
        if not source:
            return
        if self._resume_path() is not None:
            log.info("finetune=%s: not loaded, the run resumes from its own checkpoint", source)
            return
        if not Path(source).is_file():
            raise UserError(f"finetune: checkpoint not found: {source}")
        try:
            notes = load_for_finetune(self.model, source, use_ema)
        except CheckpointError as exc:
            raise CheckpointError(f"finetune={source}: {exc}") from None
        log.info("fine-tuning from %s: %s", source, "; ".join(notes))

    def _resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        self.state.load(path)
        p = self.progress
        if p.global_batch != self.global_batch:
            if not self.cfg.trainer.allow_global_batch_change:
                raise UserError(
                    f"{path} was trained with a global batch of {p.global_batch}, this run has {self.global_batch} "
                    f"(data.batch_size x world size x accumulation): keep trainer.global_batch={p.global_batch}, "
                    f"or set trainer.allow_global_batch_change=true to continue with the new one"
                )
            log.warning(
                "global batch %d -> %d: the epoch continues at sample %d",
                p.global_batch,
                self.global_batch,
                p.sample_in_epoch,
            )
            p.global_batch = self.global_batch
        self.scheduler.step_update(num_updates=p.global_step)
        log.info(
            "resumed from %s: epoch %d, sample %d, update %d (world size %d)",
            path,
            p.epoch,
            p.sample_in_epoch,
            p.global_step,
            self.dist.world_size,
        )

    # ---- the step -------------------------------------------------------------------------
    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch of black images (uint8, as the loader gives them) to stand in for one
        whose images all failed to decode; its loss is weighted zero."""
        size, batch = int(self.cfg.data.img_size), int(self.cfg.data.batch_size)
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def _progress_bar(self, total: int, initial: int, desc: str) -> tqdm:
        enabled = self.dist.is_main and self.cfg.trainer.progress_bar and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)

    def request_stop(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: will checkpoint at the next step and exit", signum)
        self.stop_requested = True

    def _skip_update(self) -> None:
        """A non-finite loss on some rank: drop this update's gradients everywhere."""
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        log.warning(
            "non-finite loss at update %d: step skipped (%d in a row, %d in total)",
            self.progress.global_step,
            self.consecutive_nonfinite,
            self.progress.nonfinite_steps,
        )
        if self.consecutive_nonfinite >= self.cfg.trainer.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive non-finite losses; stopping. The last good "
                f"checkpoint is {self.ckpt_dir / 'last.pt'} (try a lower lr, trainer.clip_grad, or bf16 over fp16)"
            )

    def _apply_update(self) -> None:
        self.consecutive_nonfinite = 0
        clip = self.cfg.trainer.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.global_step)

    def train_epoch(self, epoch: int, start_sample: int) -> EpochStats:
        """Train ``epoch`` from sample ``start_sample`` of its global order; checkpoints every
        ``trainer.checkpoint_every_steps`` updates and, on a stop request, checkpoints and raises
        :class:`StopRequested`."""
        tcfg, device, model = self.cfg.trainer, self.dist.device, self.train_model
        sampler, accum = self.data.train_sampler, self.accum_steps
        model.train()
        sampler.set_epoch(epoch, start_sample)
        updates = sampler.steps_per_epoch
        batches = updates * accum
        # Device-side accumulators: nothing in a micro-batch waits for the host.
        window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, finite count (log window)
        epoch_sums = torch.zeros(2, dtype=torch.float64, device=device)  # the same over the epoch
        bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in this update
        skipped_images, skipped_batches, epoch_images = 0, 0, 0
        has_images = False  # a decodable image in this update's micro-batches (on this rank)
        window_start = epoch_start = time.perf_counter()
        window_images = 0
        done = sampler.steps_done * accum
        bar = self._progress_bar(done + batches, done, f"epoch {epoch}")

        for batch_idx, (images, labels, failed) in enumerate(self.data.train_loader):
            for name in failed:
                log.warning("skipped undecodable image: %s", name)
            skipped_images += len(failed)
            empty = images.shape[0] == 0
            if empty:
                # Every image of this micro-batch failed to decode. It still runs, on a blank
                # stand-in with zero weight: a rank that skipped its backward would leave the
                # others waiting in DDP's gradient all-reduce.
                skipped_batches += 1
                log.warning("epoch %d, micro-batch %d: no decodable image; skipped", epoch, batch_idx)
                images, labels = self._blank_batch()
            has_images |= not empty
            # Erasing / mixup draws are keyed by the micro-batch's place in the epoch's global
            # order, so they are the same whichever rank (and world size) computes it.
            with keyed_rng(tcfg.seed, epoch, sampler.micro_batch_offset(batch_idx)):
                images, labels = self.data.train_transform(images, labels)
            is_update = (batch_idx + 1) % accum == 0
            no_sync = model.no_sync() if (self.dist.distributed and not is_update) else contextlib.nullcontext()
            weight = 0.0 if empty else 1.0
            with no_sync:
                with self.autocast():
                    loss = self.criterion(model(images), labels)
                if empty:
                    loss = loss * 0.0
                finite = torch.isfinite(loss.detach())
                bad |= ~finite
                self.scaler.scale(loss / accum).backward()
            window += torch.stack([torch.where(finite, loss.detach().double(), 0.0), finite.double() * weight])
            window_images += 0 if empty else images.shape[0]
            if not is_update:
                continue

            # One collective, one host sync per update: any rank's NaN skips the step everywhere,
            # and so does an update without a single decodable image on any rank.
            flags = torch.tensor([self.stop_requested, has_images], device=device)
            any_bad, stop, any_images = D.any_rank(torch.cat([bad.view(1), flags]), device)
            bad.zero_()
            has_images = False
            if any_bad:
                self._skip_update()
            elif not any_images:
                self.optimizer.zero_grad(set_to_none=True)
                log.warning("update %d: no decodable image on any rank; step skipped", self.progress.global_step)
            else:
                self._apply_update()
            self.progress.global_step += 1
            self.scheduler.step_update(num_updates=self.progress.global_step)

            if self.progress.global_step % tcfg.log_every_steps == 0 or batch_idx + 1 == batches:
                elapsed = time.perf_counter() - window_start
                loss_sum, count = D.all_reduce_sum(window, device)
                epoch_sums += window
                img_s = window_images * self.dist.world_size / max(elapsed, 1e-9)
                row = {
                    "split": "train",
                    "epoch": epoch,
                    "step": self.progress.global_step,
                    "loss": loss_sum / max(count, 1),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "img_per_sec": img_s,
                    "nonfinite_steps": self.progress.nonfinite_steps,
                }
                self.metrics.write(row, step=self.progress.global_step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{img_s:.0f}")
                window.zero_()
                epoch_images += window_images
                window_start, window_images = time.perf_counter(), 0
            bar.update(accum)

            every = tcfg.checkpoint_every_steps
            if stop or (every and self.progress.global_step % every == 0 and self.consecutive_nonfinite == 0):
                trained = start_sample + (batch_idx + 1) // accum * self.global_batch
                self.progress.epoch, self.progress.sample_in_epoch = epoch, trained
                self.save_checkpoint()
            if stop:
                bar.close()
                raise StopRequested(f"stop requested: checkpoint written at epoch {epoch}, sample {trained}")
        bar.close()
        seconds = time.perf_counter() - epoch_start
        skips = torch.tensor([float(skipped_images), float(skipped_batches)], dtype=torch.float64, device=device)
        loss_sum, count, skipped, skipped_batches = D.all_reduce_sum(torch.cat([epoch_sums, skips]), device)
        if skipped:
            log.warning(
                "epoch %d: %d undecodable images skipped (%d micro-batches left empty)",
                epoch,
                int(skipped),
                int(skipped_batches),
            )
        return EpochStats(
            loss=loss_sum / max(count, 1),
            images_per_sec=epoch_images * self.dist.world_size / max(seconds, 1e-9),
            seconds=seconds,
            skipped_images=int(skipped),
            skipped_batches=int(skipped_batches),
        )

    # ---- the run --------------------------------------------------------------------------
    def _log_setup(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        OmegaConf.save(OmegaConf.create(self.config_plain), self.run_dir / "config.yaml")
        log.info("run dir %s", self.run_dir.resolve())
        log.info(
            "model %s: %.2fM params | world %d x batch %d x accum %d = global batch %d | lr %.3g (base %.3g)",
            cfg.model.name,
            n_params / 1e6,
            self.dist.world_size,
            cfg.data.batch_size,
            self.accum_steps,
            self.global_batch,
            self.lr,
            cfg.optim.base_lr,
        )
        self.metrics.write(
            {
                "split": "setup",
                "global_batch": self.global_batch,
                "batch_size": cfg.data.batch_size,
                "accum_steps": self.accum_steps,
                "lr": self.lr,
                "params": n_params,
                "updates_per_epoch": self.data.updates_per_epoch,
                "scan": describe_scan(self.model, self.dist.device),
            }
        )

    def fit(self) -> dict[str, Any]:
        tcfg = self.cfg.trainer
        if self.dist.is_main:
            self._log_setup()
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGTERM)):
            signal.signal(sig, self.request_stop)

        last_eval: dict[str, Any] = {}
        first_epoch, epoch_seconds = self.progress.epoch, []
        for epoch in range(first_epoch, tcfg.epochs):
            stats = self.train_epoch(epoch, self.progress.sample_in_epoch if epoch == first_epoch else 0)
            epoch_seconds.append(stats.seconds)
            eta = (tcfg.epochs - epoch - 1) * sum(epoch_seconds) / len(epoch_seconds)
            summary = (
                f"epoch {epoch}: train loss {stats.loss:.4f} | {stats.images_per_sec:.0f} img/s | "
                f"{stats.seconds:.1f} s (ETA {_clock(eta)})"
            )
            if (epoch + 1) % tcfg.eval_every_epochs == 0 or epoch + 1 == tcfg.epochs:
                last_eval = self._evaluate_epoch(epoch, stats)
                summary += " | val top-1 " + " ".join(
                    f"{w} {last_eval[f'{w}_top1']:.2f}%" for w in last_eval["weights"]
                )
                summary += f" | best {self.progress.best_top1:.2f}% (epoch {self.progress.best_epoch})"
            log.info(summary)
            is_best = bool(last_eval) and last_eval["epoch"] == epoch and last_eval["best"]
            self.progress.epoch, self.progress.sample_in_epoch = epoch + 1, 0
            self.save_checkpoint(best=is_best)
        if self.dist.is_main:
            log.info(
                "done: best val top-1 %.2f%% (%s weights, epoch %d)",
                self.progress.best_top1,
                self.best_source(),
                self.progress.best_epoch,
            )
            if self.wandb is not None:
                if self.cfg.logger.get("upload_best") and (self.ckpt_dir / "best.pt").is_file():
                    upload_artifact(self.wandb, self.ckpt_dir / "best.pt", f"{self.cfg.name}-best")
                self.wandb.finish()
        last_eval.pop("weights", None)
        return {"best_top1": self.progress.best_top1, "best_epoch": self.progress.best_epoch, **last_eval}

    def _evaluate_epoch(self, epoch: int, stats: EpochStats) -> dict[str, Any]:
        loader, transform, device = self.data.val_loader, self.data.eval_transform, self.dist.device
        results = {"raw": evaluate(self.model, loader, transform, self.autocast, device)}
        if self.ema is not None:
            results["ema"] = evaluate(self.ema.module, loader, transform, self.autocast, device)
        train = {"train_loss": stats.loss, "train_img_per_sec": stats.images_per_sec, "epoch_seconds": stats.seconds}
        for weights, r in results.items():
            row = {"split": "val", "epoch": epoch, "weights": weights, **r, **train}
            skips = {"skipped_images": stats.skipped_images, "skipped_batches": stats.skipped_batches}
            self.metrics.write({**row, **skips}, step=self.progress.global_step)
        top1 = results[self.best_source()]["top1"]
        best = top1 > self.progress.best_top1
        if best:
            self.progress.best_top1, self.progress.best_epoch = top1, epoch
        return {
            "epoch": epoch,
            "best": best,
            "top1": top1,
            "weights": list(results),
            **{f"{w}_top1": r["top1"] for w, r in results.items()},
        }

    def close(self) -> None:
        """Stop the loaders' workers now (not at interpreter exit, see ``release_workers``)."""
        release_workers(self.data.train_loader, self.data.val_loader)


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        D.cleanup()
