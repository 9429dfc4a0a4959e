"""The training run: built from the config, it owns the epochs and the step (torchtitan's
Trainer shape; DeiT's main.py + engine.py, made resumable).

Read it top to bottom: :meth:`Trainer.micro_step` is one micro-batch (device-side augmentation,
autocast, forward, loss, backward), :meth:`Trainer.update` is one optimizer update (the
cross-rank agreement on non-finite losses and stop requests, clipping, the scaler, the
optimizer, EMA, the lr), :meth:`Trainer.train_epoch` is the loop between them, with the log
window (:class:`~shufflemamba.engine.log_window.LogWindow`) and the checkpoint manager
(:class:`~shufflemamba.engine.checkpointing.CheckpointManager`) asked at the update boundaries.
What a run resumes from is declared once, in :meth:`Trainer._training_state`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import TrainingState
from ..config import to_plain
from ..data.loader import release_workers
from ..errors import CheckpointError, NonFiniteLossError, StopRequested, UserError
from ..models import VisionMamba
from ..models.layer_shuffle import layer_order_loss
from ..ops import describe_scan
from ..rng import capture_rng, keyed_rng, restore_rng, seed_all
from . import distributed as D
from .builders import (
    autocast_factory,
    build_criterion,
    build_ema,
    build_model,
    build_optimizer,
    build_scheduler,
    build_train_data,
    resolve_input_settings,
    scaled_lr,
)
from .checkpointing import CheckpointManager
from .choices import validate
from .evaluator import check_shuffle_samples, evaluate
from .log_window import EpochStats, LogWindow
from .tracking import MetricsWriter, setup_logging, start_wandb, upload_artifact

log = logging.getLogger("shufflemamba")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


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
        unknown = sorted(set(state) - {f.name for f in fields(self)})
        if unknown:
            raise CheckpointError(f"the checkpoint's progress has entries this version does not know: {unknown}")
        for key, value in state.items():
            setattr(self, key, value)


class StopFile:
    """``trainer.stop_file``: a file whose appearance asks for a checkpoint and a clean stop, the
    way a batch script that got the scheduler's time-limit warning can reach every training
    process on every node through torchrun and srun (which treat signals as "kill"). Checked by
    rank 0 at most once a second; the answer reaches every rank through the per-update collective."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.next_check, self.seen = 0.0, False

    def appeared(self) -> bool:
        if self.path is None or self.seen:
            return self.seen
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check, self.seen = now + 1.0, self.path.exists()
            if self.seen:
                log.warning("stop file %s appeared: will checkpoint at the next step and exit", self.path)
        return self.seen

    def consume(self) -> None:
        """Remove the file once the checkpoint is written: its absence tells the batch script so."""
        if self.seen and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


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


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Trainer:
    """One training run on one rank: built from ``cfg``, resumed from ``run_dir``'s last.pt."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        validate(cfg)
        if cfg.checkpoint.finetune_required and not cfg.checkpoint.finetune:
            raise UserError("checkpoint.finetune is not set: this preset fine-tunes a checkpoint; pass it the PATH")
        self.cfg, self.run_dir = cfg, run_dir
        self.dist = D.init_distributed(cfg.trainer.device)
        setup_logging(run_dir, self.dist.is_main)
        tcfg = cfg.trainer
        if tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_all(tcfg.seed + self.dist.rank)  # ranks draw independently (drop path, shuffle)
        self.autocast = autocast_factory(tcfg.precision, self.dist.device)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=tcfg.precision == "fp16")

        # The order below is the dependencies, passed along as values:
        # 1. the model, its start weights (a fine-tuning source), then the EMA copied from them;
        #    the model first, so config errors surface before any data is read.
        model = build_model(cfg, self.dist.device)
        check_shuffle_samples(model, cfg.eval.shuffle_samples)
        resolve_input_settings(cfg.data, model)  # crop / interpolation / mean / std the data leaves to the model
        self.config_plain = to_plain(cfg)
        self.checkpoints = CheckpointManager(cfg.checkpoint, run_dir, self.dist, self.config_plain)
        self.model = self.checkpoints.start_weights(model)
        self._check_layer_shuffle(cfg)
        if tcfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.ema = build_ema(tcfg, self.model)
        # 2. the data, and the batch plan it fixes (global batch -> lr, updates per epoch -> schedule)
        self.data = build_train_data(cfg, self.dist)
        self.plan = self.data.plan
        self.criterion = build_criterion(cfg.aug)
        self.lr = scaled_lr(cfg.optim, self.plan.global_batch)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.lr)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, tcfg.epochs, self.data.updates_per_epoch)
        self.train_model = self._wrap(self.model)
        # 3. every component exists: restore them all from the run's own checkpoint, if any
        self.progress = RunProgress(global_batch=self.plan.global_batch)
        self.state = self._training_state()
        if self.checkpoints.resume(self.state, self.progress, self.plan.global_batch):
            self.scheduler.step_update(num_updates=self.progress.global_step)
        # 4. tracking, which continues the resumed run's wandb run
        self.wandb = None
        if self.dist.is_main:
            self.wandb = start_wandb(cfg.logger, run_dir, self.config_plain, self.progress.wandb_run_id)
        if self.wandb is not None:
            self.progress.wandb_run_id = self.wandb.id
        self.metrics = MetricsWriter(run_dir, self.dist.world_size, self.dist.is_main, self.wandb)
        self.consecutive_nonfinite = 0
        self.stop_requested = False
        self.last_aux_loss: torch.Tensor | None = None
        self.stop_file = StopFile(tcfg.stop_file if self.dist.is_main else None)

    def _check_layer_shuffle(self, cfg: DictConfig) -> None:
        """LayerShuffle picks the block order in Python per forward: refused where that cannot run."""
        if cfg.model.get("layer_shuffle", "none") == "none":
            return
        if cfg.trainer.compile:
            raise UserError("trainer.compile with model.layer_shuffle: the block order is drawn per batch in Python, "
                            "which one compiled graph cannot follow; train eager (trainer.compile=false)")  # fmt: skip
        if cfg.trainer.grad_checkpointing and not isinstance(self.model, VisionMamba):
            raise UserError("trainer.grad_checkpointing with model.layer_shuffle on a ViT: timm checkpoints the "
                            "blocks in their stored order; turn one of them off")  # fmt: skip

    def _wrap(self, model: nn.Module) -> Any:
        """The module the step calls: DDP across ranks, compiled with ``trainer.compile``."""
        wrapped: Any = model
        if self.dist.distributed:
            device_ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(wrapped) if self.cfg.trainer.compile else wrapped

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
        return self.checkpoints.best_source(has_ema=self.ema is not None)

    def save_checkpoint(self, best: bool = False) -> None:
        self.checkpoints.save(self.state, self.progress.global_step, self.best_source(), best=best)

    # ---- the step -------------------------------------------------------------------------
    def _blank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch of black images (uint8, as the loader gives them) to stand in for one
        whose images all failed to decode; its loss is weighted zero."""
        size, batch = int(self.cfg.data.img_size), self.plan.micro_batch
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long)

    def micro_step(
        self, images: torch.Tensor, labels: torch.Tensor, sync: bool, blank: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one (already augmented) micro-batch; gradients accumulate.
        DDP's all-reduce runs only with ``sync`` (the update's last micro-batch). Returns the
        detached loss and whether it is finite, both on the device (no host sync)."""
        model = self.train_model
        no_sync = model.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                loss = self.criterion(model(images), labels)
            aux = layer_order_loss(self.model)  # LayerShuffle "predict": which slot each block ran at
            total = loss if aux is None else loss + aux
            if blank:
                total = total * 0.0
            self.scaler.scale(total / self.plan.accum_steps).backward()
        loss = (loss * 0.0 if blank else loss).detach()
        self.last_aux_loss = None if aux is None else aux.detach()
        return loss, torch.isfinite(total.detach())

    def update(self, any_nonfinite: torch.Tensor, has_images: bool) -> tuple[bool, bool]:
        """One optimizer update, agreed by all ranks in one collective (one host sync): a
        non-finite loss on any rank skips it everywhere, and so does an update with no decodable
        image on any rank. Returns whether some rank was signalled to stop, and whether the stop
        file appeared (seen by rank 0)."""
        flags = torch.tensor([self.stop_requested, self.stop_file.appeared(), has_images], device=self.dist.device)
        nonfinite, signalled, by_file, any_images = D.any_rank(
            torch.cat([any_nonfinite.view(1), flags]), self.dist.device
        )
        if nonfinite:
            self._skip_nonfinite_update()
        elif not any_images:
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("update %d: no decodable image on any rank; step skipped", self.progress.global_step)
        else:
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
        self.progress.global_step += 1
        self.scheduler.step_update(num_updates=self.progress.global_step)
        return signalled, by_file

    def _skip_nonfinite_update(self) -> None:
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
                f"checkpoint is {self.checkpoints.last} (try a lower lr, trainer.clip_grad, or bf16 over fp16)"
            )

    def request_stop(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: will checkpoint at the next step and exit", signum)
        self.stop_requested = True

    def _progress_bar(self, total: int, initial: int, desc: str) -> tqdm:
        enabled = self.dist.is_main and self.cfg.trainer.progress_bar and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)

    def train_epoch(self, epoch: int, start_sample: int) -> EpochStats:
        """Train ``epoch`` from sample ``start_sample`` of its global order; a checkpoint every
        ``checkpoint.every_steps`` updates and, on a stop request, a checkpoint and
        :class:`StopRequested`."""
        tcfg, sampler, accum = self.cfg.trainer, self.data.train_sampler, self.plan.accum_steps
        self.train_model.train()
        sampler.set_epoch(epoch, start_sample)
        micro_batches = sampler.updates_left * accum
        window = LogWindow(self.dist.device, self.dist.world_size)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)  # in this update, on this rank
        has_images = False  # a decodable image in this update's micro-batches, on this rank
        bar = self._progress_bar(sampler.updates_done * accum + micro_batches, sampler.updates_done * accum,
                                 f"epoch {epoch}")  # fmt: skip

        for i, (images, labels, failed) in enumerate(self.data.train_loader):
            for name in failed:
                log.warning("skipped undecodable image: %s", name)
            blank = images.shape[0] == 0
            window.skipped(len(failed), int(blank))
            if blank:
                # Every image of this micro-batch failed to decode. It still runs, on a blank
                # stand-in with zero weight: a rank that skipped its backward would leave the
                # others waiting in DDP's gradient all-reduce.
                log.warning("epoch %d, micro-batch %d: no decodable image; skipped", epoch, i)
                images, labels = self._blank_batch()
            has_images |= not blank
            # Erasing / mixup draws are keyed by the micro-batch's place in the epoch's global
            # order, so they are the same whichever rank (and world size) computes it.
            with keyed_rng(tcfg.seed, epoch, sampler.micro_batch_offset(i)):
                images, labels = self.data.train_transform(images, labels)
            sync = (i + 1) % accum == 0
            loss, finite = self.micro_step(images, labels, sync=sync, blank=blank)
            nonfinite |= ~finite
            window.add(loss, finite, 0 if blank else images.shape[0], counts=not blank, aux=self.last_aux_loss)
            if not sync:
                continue

            signalled, by_file = self.update(nonfinite, has_images)
            stop = signalled or by_file
            nonfinite.zero_()
            has_images = False
            if self.progress.global_step % tcfg.log_every_steps == 0 or i + 1 == micro_batches:
                row = window.row(epoch=epoch, step=self.progress.global_step, lr=self.optimizer.param_groups[0]["lr"],
                                 nonfinite_steps=self.progress.nonfinite_steps)  # fmt: skip
                self.metrics.write(row, step=self.progress.global_step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_sec']:.0f}")
            bar.update(accum)
            if stop or (self.checkpoints.due(self.progress.global_step) and self.consecutive_nonfinite == 0):
                trained = start_sample + (i + 1) // accum * self.plan.global_batch
                self.progress.epoch, self.progress.sample_in_epoch = epoch, trained
                self.save_checkpoint()
            if stop:
                bar.close()
                self.stop_file.consume()  # answered: the checkpoint is written (the batch script reads this)
                raise StopRequested(
                    f"stop requested{'' if signalled else ' (stop file)'}: checkpoint written at epoch {epoch}, "
                    f"sample {trained}",
                    exit_code=143 if signalled else 0,  # a signal's 143; 0 keeps torchrun from restarting
                )
        bar.close()
        stats = window.epoch_stats()
        if stats.skipped_images:
            log.warning(
                "epoch %d: %d undecodable images skipped (%d micro-batches left empty)",
                epoch,
                stats.skipped_images,
                stats.skipped_batches,
            )
        return stats

    # ---- the run --------------------------------------------------------------------------
    def _log_setup(self) -> None:
        cfg, plan = self.cfg, self.plan
        n_params = sum(p.numel() for p in self.model.parameters())
        OmegaConf.save(OmegaConf.create(self.config_plain), self.run_dir / "config.yaml")
        log.info("run dir %s", self.run_dir.resolve())
        log.info(
            "model %s: %.2fM params | world %d x batch %d x accum %d = global batch %d | lr %.3g (base %.3g)",
            cfg.model.name,
            n_params / 1e6,
            plan.world_size,
            plan.micro_batch,
            plan.accum_steps,
            plan.global_batch,
            self.lr,
            cfg.optim.base_lr,
        )
        self.metrics.write(
            {
                "split": "setup",
                "global_batch": plan.global_batch,
                "batch_size": plan.micro_batch,
                "accum_steps": plan.accum_steps,
                "lr": self.lr,
                "params": n_params,
                "updates_per_epoch": self.data.updates_per_epoch,
                "scan": describe_scan(self.model, self.dist.device),
            }
        )

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM / SIGINT / SIGUSR1 ask for a checkpoint and a clean stop while training; the
        previous handlers are back afterwards."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self) -> dict[str, Any]:
        tcfg = self.cfg.trainer
        if self.dist.is_main:
            self._log_setup()
        last_eval: dict[str, Any] = {}
        first_epoch, epoch_seconds = self.progress.epoch, []
        with self._stop_on_signals():
            for epoch in range(first_epoch, tcfg.epochs):
                stats = self.train_epoch(epoch, self.progress.sample_in_epoch if epoch == first_epoch else 0)
                epoch_seconds.append(stats.seconds)
                eta = (tcfg.epochs - epoch - 1) * sum(epoch_seconds) / len(epoch_seconds)
                rate_digits = 1 if stats.images_per_sec < 10 else 0  # a 224-px model on a CPU: not "0 img/s"
                summary = (
                    f"epoch {epoch}: train loss {stats.loss:.4f} | {stats.images_per_sec:.{rate_digits}f} img/s | "
                    f"{stats.seconds:.1f} s (ETA {_clock(eta)})"
                )
                if (epoch + 1) % tcfg.eval_every_epochs == 0 or epoch + 1 == tcfg.epochs:
                    last_eval = self._evaluate_epoch(epoch, stats)
                    summary += " | val top-1 " + " ".join(
                        f"{w} {last_eval[f'{w}_top1']:.2f}%" for w in last_eval["weights"]
                    )
                    if f"{last_eval['weights'][0]}_mc_top1" in last_eval:
                        summary += f" | {self.cfg.eval.shuffle_samples}-pass shuffle average " + " ".join(
                            f"{w} {last_eval[f'{w}_mc_top1']:.2f}%" for w in last_eval["weights"]
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
                if self.cfg.logger.get("upload_best") and self.checkpoints.best.is_file():
                    upload_artifact(self.wandb, self.checkpoints.best, f"{self.cfg.name}-best")
                self.wandb.finish()
        last_eval.pop("weights", None)
        return {"best_top1": self.progress.best_top1, "best_epoch": self.progress.best_epoch, **last_eval}

    def _evaluate_epoch(self, epoch: int, stats: EpochStats) -> dict[str, Any]:
        loader, transform, device = self.data.val_loader, self.data.eval_transform, self.dist.device
        evaluation = self.cfg.eval
        passes = dict(
            shuffle_samples=evaluation.shuffle_samples, seed=evaluation.seed, layer_order=evaluation.layer_order
        )
        results = {"raw": evaluate(self.model, loader, transform, self.autocast, device, **passes)}
        if self.ema is not None:
            results["ema"] = evaluate(self.ema.module, loader, transform, self.autocast, device, **passes)
        train = {"train_loss": stats.loss, "train_img_per_sec": stats.images_per_sec, "epoch_seconds": stats.seconds}
        skips = {"skipped_images": stats.skipped_images, "skipped_batches": stats.skipped_batches}
        for weights, r in results.items():
            row = {"split": "val", "epoch": epoch, "weights": weights, **r, **train, **skips}
            self.metrics.write(row, step=self.progress.global_step)
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
            **{f"{w}_mc_top1": r["mc_top1"] for w, r in results.items() if "mc_top1" in r},
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
