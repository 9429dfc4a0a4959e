"""Everything a run is built from, each from its config group: model, data, loss, optimizer,
schedule, EMA, precision. Training and evaluation both build through here; nothing here runs
a step or touches a checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from omegaconf import DictConfig
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from ..config import model_kwargs
from ..data.datasets import build_dataset
from ..data.loader import DeviceBatchTransform, build_eval_loader, build_train_loader
from ..data.samplers import ResumableTrainSampler
from ..data.transforms import build_eval_transform, build_train_transform
from ..errors import UserError
from ..ops import CudaKernelsUnavailable, TritonUnavailable, cuda_kernels_available, describe_scan
from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)
LR_REFERENCE_BATCH = 512  # lr = base_lr x global batch / 512 (DeiT's linear scaling rule)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; None means fp32 (no autocast). ``auto``: bf16 on GPU, fp32 on CPU.
    (The choice itself was checked by :func:`shufflemamba.config.validate`.)"""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    name, kwargs = model_kwargs(cfg.model)
    if name not in timm.list_models():
        raise UserError(f"unknown model {name!r}: not a timm model name (configured families: conf/model/*.yaml)")
    if device.type == "cuda":
        cuda_kernels_available()  # import the kernels now: a compiled model then sees a constant
    model = timm.create_model(name, **kwargs).to(device)
    try:  # the scan backend this model runs on this device, decided now: a missing kernel fails here
        scan = describe_scan(model, device)
    except (CudaKernelsUnavailable, TritonUnavailable) as exc:
        raise UserError(str(exc)) from None
    if scan:
        log.info("%s: %s", name, scan)
    return model


def resolve_accumulation(trainer_cfg: DictConfig, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps: derived from ``trainer.global_batch`` when set (so a recipe's
    global batch holds on any number of GPUs), else ``trainer.grad_accum_steps``."""
    accum, global_batch = int(trainer_cfg.grad_accum_steps), trainer_cfg.get("global_batch")
    if accum < 1:
        raise UserError("trainer.grad_accum_steps must be >= 1")
    if global_batch is None:
        return accum
    per_micro_step = micro_batch * world_size
    if global_batch % per_micro_step:
        per_rank = global_batch / world_size
        sizes = [d for d in range(1, int(per_rank) + 1) if per_rank == int(per_rank) and int(per_rank) % d == 0]
        below = max((d for d in sizes if d <= micro_batch), default=None)
        above = min((d for d in sizes if d > micro_batch), default=None)
        fix = " or ".join(str(d) for d in (below, above) if d) or f"none (it does not split over {world_size} ranks)"
        raise UserError(
            f"trainer.global_batch={global_batch} is not a whole number of micro-batches of data.batch_size="
            f"{micro_batch} x {world_size} rank(s); nearest valid data.batch_size: {fix}"
        )
    derived = global_batch // per_micro_step
    if accum not in (1, derived):
        raise UserError(
            f"trainer.grad_accum_steps={accum} contradicts trainer.global_batch={global_batch} "
            f"(= {micro_batch} x {world_size} rank(s) x {derived}): set only trainer.global_batch"
        )
    return derived


@dataclass
class TrainData:
    """The loaders and on-device batch transforms of a training run."""

    train_loader: DataLoader
    train_sampler: ResumableTrainSampler
    val_loader: DataLoader
    train_transform: DeviceBatchTransform  # normalise, erase, mix
    eval_transform: DeviceBatchTransform  # normalise only
    updates_per_epoch: int


def build_train_data(cfg: DictConfig, dist: DistInfo, accum_steps: int) -> TrainData:
    """Datasets, loaders and batch transforms; rank 0 builds the cached file index first."""
    tcfg = cfg.trainer
    if not dist.is_main:
        barrier()
    train_set = build_dataset(cfg.data, "train", build_train_transform(cfg.data, cfg.aug), is_main=dist.is_main)
    val_set = build_dataset(cfg.data, "val", build_eval_transform(cfg.data), is_main=dist.is_main)
    if dist.is_main:
        barrier()
    train_loader, sampler = build_train_loader(
        train_set, cfg.data, cfg.aug, dist.rank, dist.world_size, accum_steps, tcfg.seed
    )
    if tcfg.max_steps_per_epoch:
        sampler.max_steps = int(tcfg.max_steps_per_epoch)
    num_classes = cfg.data.num_classes
    return TrainData(
        train_loader=train_loader,
        train_sampler=sampler,
        val_loader=build_eval_loader(val_set, cfg.data, dist.rank, dist.world_size),
        train_transform=DeviceBatchTransform(cfg.data, cfg.aug, dist.device, num_classes),
        eval_transform=DeviceBatchTransform(cfg.data, None, dist.device, num_classes),
        updates_per_epoch=sampler.steps_per_epoch,
    )


def build_criterion(aug_cfg: DictConfig, mixes_labels: bool) -> nn.Module:
    """Soft-target CE when mixup/cutmix produce soft labels (smoothing is folded into them),
    else label-smoothing CE, else plain CE."""
    if mixes_labels:
        return SoftTargetCrossEntropy()
    if aug_cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(aug_cfg.smoothing)
    return nn.CrossEntropyLoss()


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    return optim_cfg.base_lr * global_batch / LR_REFERENCE_BATCH


def build_optimizer(optim_cfg: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory: its no-weight-decay rules (1-D params and the model's
    ``no_weight_decay()``) and layer-wise lr decay through the model's ``group_matcher``."""
    return create_optimizer_v2(
        model,
        opt=optim_cfg.name,
        lr=lr,
        weight_decay=optim_cfg.weight_decay,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        layer_decay=optim_cfg.layer_decay,
    )


def build_scheduler(sched_cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int):
    """timm's scheduler factory from ``sched`` (``name`` and the factory's own keys), stepped
    every optimizer update: epochs in the config are converted to updates by timm."""
    settings: dict[str, Any] = {k: v for k, v in sched_cfg.items() if k != "name"}
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched_cfg.name,
        num_epochs=epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **settings,
    )
    assert isinstance(scheduler, Scheduler)
    return scheduler


def build_ema(trainer_cfg: DictConfig, model: nn.Module) -> ModelEmaV3 | None:
    return ModelEmaV3(model, decay=trainer_cfg.ema.decay) if trainer_cfg.ema.enabled else None
