"""Builds a training run from the config and drives the epochs (DeiT's main.py, made resumable).

Everything a step needs lives on :class:`Run`; the step itself is in :mod:`.loop`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import shufflemamba  # noqa: F401  (registers the models with timm)

from ..config import UserError, model_kwargs, to_plain
from ..data.datasets import build_dataset, seed_everything_local
from ..data.loader import DeviceBatchTransform, build_eval_loader, build_train_loader, release_workers
from ..data.transforms import build_eval_transform, build_train_transform
from . import distributed as D
from .loop import evaluate, train_one_epoch
from .state import capture_rng, load_training_checkpoint, restore_rng, save_atomic
from .tracking import MetricsWriter, setup_logging, start_wandb, upload_artifact

log = logging.getLogger("shufflemamba")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32 (no autocast). ``auto``: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise UserError(f"trainer.precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return table[precision]


def build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    name, kwargs = model_kwargs(cfg.model)
    if name not in timm.list_models():
        raise UserError(f"unknown model {name!r}: not a timm model name (configured families: conf/model/*.yaml)")
    return timm.create_model(name, **kwargs).to(device)


class Run:
    """All state of one training run, on one rank."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.dist = D.init_distributed(cfg.trainer.device)
        setup_logging(run_dir, self.dist.is_main)
        tcfg = cfg.trainer
        if tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything_local(tcfg.seed + self.dist.rank)  # ranks draw independently (drop path, shuffle)
        self.amp_dtype = resolve_precision(tcfg.precision, self.dist.device)
        self.accum_steps = int(tcfg.grad_accum_steps)
        if self.accum_steps < 1:
            raise UserError("trainer.grad_accum_steps must be >= 1")

        # model first: its config errors surface before any data is read (building the data draws no RNG)
        self.model = build_model(cfg, self.dist.device)
        if tcfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)

        # data (rank 0 builds the cached file index first, the others then read it)
        if not self.dist.is_main:
            D.barrier()
        train_set = build_dataset(
            cfg.data, "train", build_train_transform(cfg.data, cfg.aug), is_main=self.dist.is_main
        )
        val_set = build_dataset(cfg.data, "val", build_eval_transform(cfg.data), is_main=self.dist.is_main)
        if self.dist.is_main:
            D.barrier()
        self.train_loader, self.train_sampler = build_train_loader(
            train_set, cfg.data, cfg.aug, self.dist.rank, self.dist.world_size, tcfg.seed
        )
        usable = self.train_sampler.batches_per_epoch // self.accum_steps * self.accum_steps
        if tcfg.max_steps_per_epoch:
            usable = min(usable, int(tcfg.max_steps_per_epoch) * self.accum_steps)
        if usable == 0:
            raise UserError("no full optimizer step fits in an epoch: lower data.batch_size or grad_accum_steps")
        self.train_sampler.batches_per_epoch = usable
        self.updates_per_epoch = usable // self.accum_steps
        self.val_loader = build_eval_loader(val_set, cfg.data, self.dist.rank, self.dist.world_size)
        num_classes = cfg.data.num_classes
        self.batch_transform = DeviceBatchTransform(cfg.data, cfg.aug, self.dist.device, num_classes)
        self.eval_transform = DeviceBatchTransform(cfg.data, None, self.dist.device, num_classes)

        # loss, optimizer, schedule, EMA
        if self.batch_transform.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.aug.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.aug.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.global_batch = cfg.data.batch_size * self.dist.world_size * self.accum_steps
        self.lr = cfg.optim.base_lr * self.global_batch / 512
        self.optimizer = create_optimizer_v2(
            self.model,
            opt=cfg.optim.name,
            lr=self.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            layer_decay=cfg.optim.layer_decay,
        )
        total_updates = self.updates_per_epoch * tcfg.epochs
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=total_updates,
            lr_min=cfg.sched.min_lr,
            warmup_t=int(cfg.sched.warmup_epochs * self.updates_per_epoch),
            warmup_lr_init=cfg.sched.warmup_lr,
            t_in_epochs=False,
        )
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=tcfg.ema.decay) if tcfg.ema.enabled else None

        self.train_model: Any = self.model
        if self.dist.distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None
            )
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)

        self.epoch, self.start_batch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch = -1.0, -1
        self.nonfinite_steps = self.consecutive_nonfinite = 0
        self.wandb_id: str | None = None
        self.stop_requested = False
        self.config_plain = to_plain(cfg)
        self._resume()

        self.wandb = start_wandb(cfg.logger, run_dir, self.config_plain, self.wandb_id) if self.dist.is_main else None
        if self.wandb is not None:
            self.wandb_id = self.wandb.id
        self.metrics = MetricsWriter(run_dir, self.dist.world_size, self.dist.is_main, self.wandb)

    # ---- helpers used by the loop ---------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def progress(self, total: int, initial: int, desc: str):
        enabled = self.dist.is_main and self.cfg.trainer.progress_bar and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)

    def request_stop(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: will checkpoint at the next step and exit", signum)
        self.stop_requested = True

    # ---- checkpoints ----------------------------------------------------------------------
    def _state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        rng = D.gather_objects(capture_rng())  # every rank's generators, indexed by rank
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "sampler": {"epoch": epoch, "start_batch": step_in_epoch, "seed": self.train_sampler.seed},
            "rng": rng,
            "world_size": self.dist.world_size,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_weights": self._best_source(),
            "nonfinite_steps": self.nonfinite_steps,
            "config": self.config_plain,
            "wandb_run_id": self.wandb_id,
        }

    def _best_source(self) -> str:
        return "ema" if (self.cfg.trainer.best_by == "ema" and self.ema is not None) else "raw"

    def save_checkpoint(self, epoch: int, step_in_epoch: int, best: bool = False) -> None:
        state = self._state(epoch, step_in_epoch)  # collective: every rank takes part
        if self.dist.is_main:
            save_atomic(state, self.ckpt_dir / "last.pt")
            if best:
                save_atomic(state, self.ckpt_dir / "best.pt")
        D.barrier()

    def _resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume in (None, "", "null", False):
            return
        path = self.ckpt_dir / "last.pt" if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume != "auto":
                raise UserError(f"trainer.resume: checkpoint not found: {path}")
            return
        state = load_training_checkpoint(path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("model_ema"):
            self.ema.module.load_state_dict(state["model_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.start_batch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.wandb_id = state.get("wandb_run_id")
        if state["world_size"] == self.dist.world_size:
            restore_rng(state["rng"][self.dist.rank])
        else:
            log.warning(
                "resuming on %d ranks from a %d-rank run: RNG streams restart",
                self.dist.world_size,
                state["world_size"],
            )
        self.scheduler.step_update(num_updates=self.global_step)
        log.info("resumed from %s: epoch %d, batch %d, update %d", path, self.epoch, self.start_batch, self.global_step)

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg.trainer
        if self.dist.is_main:
            OmegaConf.save(OmegaConf.create(self.config_plain), self.run_dir / "config.yaml")
            n_params = sum(p.numel() for p in self.model.parameters())
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
                    "lr": self.lr,
                    "params": n_params,
                    "updates_per_epoch": self.updates_per_epoch,
                }
            )
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGTERM)):
            signal.signal(sig, self.request_stop)

        last_eval: dict[str, Any] = {}
        for epoch in range(self.epoch, tcfg.epochs):
            info = train_one_epoch(self, epoch, self.start_batch if epoch == self.epoch else 0)
            if (epoch + 1) % tcfg.eval_every_epochs == 0 or epoch + 1 == tcfg.epochs:
                last_eval = self._evaluate_epoch(epoch, info)
            is_best = bool(last_eval) and last_eval["epoch"] == epoch and last_eval["best"]
            self.save_checkpoint(epoch=epoch + 1, step_in_epoch=0, best=is_best)
        if self.dist.is_main:
            log.info(
                "done: best val top-1 %.2f%% (%s weights, epoch %d)",
                self.best_top1,
                self._best_source(),
                self.best_epoch,
            )
            if self.wandb is not None:
                if cfg.logger.get("upload_best") and (self.ckpt_dir / "best.pt").is_file():
                    upload_artifact(self.wandb, self.ckpt_dir / "best.pt", f"{cfg.name}-best")
                self.wandb.finish()
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch, **last_eval}

    def _evaluate_epoch(self, epoch: int, info: dict[str, Any]) -> dict[str, Any]:
        results = {"raw": evaluate(self.model, self.val_loader, self.eval_transform, self.autocast, self.dist.device)}
        if self.ema is not None:
            results["ema"] = evaluate(
                self.ema.module, self.val_loader, self.eval_transform, self.autocast, self.dist.device
            )
        for weights, r in results.items():
            self.metrics.write({"split": "val", "epoch": epoch, "weights": weights, **r, **info}, step=self.global_step)
        source = self._best_source()
        top1 = results[source]["top1"]
        best = top1 > self.best_top1
        if best:
            self.best_top1, self.best_epoch = top1, epoch
        log.info(
            "epoch %d: val top-1 %s | best %.2f%% (epoch %d)",
            epoch,
            " ".join(f"{w} {r['top1']:.2f}%" for w, r in results.items()),
            self.best_top1,
            self.best_epoch,
        )
        return {"epoch": epoch, "best": best, "top1": top1, **{f"{w}_top1": r["top1"] for w, r in results.items()}}


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    run = Run(cfg, run_dir)
    try:
        return run.fit()
    finally:
        release_workers(run.train_loader, run.val_loader)
        D.cleanup()
