"""Everything a run is built from, each from its config group: model, data, loss, optimizer,
schedule, EMA, precision. Training and evaluation both build through here; nothing here runs
a step or touches a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import build_dataset
from ..data.loader import DeviceBatchTransform, build_eval_loader, build_train_loader, mixup_active
from ..data.samplers import ResumableTrainSampler
from ..data.transforms import build_eval_transform, build_train_transform
from ..errors import UserError
from ..models.from_config import model_kwargs
from ..models.layer_shuffle import with_layer_shuffle
from ..ops import CudaKernelsUnavailable, TritonUnavailable, cuda_kernels_available, describe_scan
from .batching import BatchPlan, plan_batches
from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)
LR_REFERENCE_BATCH = 512  # lr = base_lr x global batch / 512 (DeiT's linear scaling rule)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# timm schedulers that can be stepped per optimizer update (plateau steps on epoch metrics).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant")
INPUT_KEYS = ("crop_pct", "interpolation", "mean", "std")  # data settings the model's pretrained_cfg supplies


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; None means fp32 (no autocast). ``auto``: bf16 on GPU, fp32 on CPU.
    (The choice itself was checked by :func:`shufflemamba.engine.choices.validate`.)"""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument context factory: autocast to ``precision``'s dtype, or nothing for fp32."""
    dtype = resolve_precision(precision, device)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return autocast


def build_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    name, kwargs = model_kwargs(cfg.model)
    if name not in timm.list_models():
        raise UserError(f"unknown model {name!r}: not a timm model name (configured families: conf/model/*.yaml)")
    if device.type == "cuda":
        cuda_kernels_available()  # import the kernels now: a compiled model then sees a constant
    model = timm.create_model(name, **kwargs).to(device)
    layer_shuffle = cfg.model.get("layer_shuffle", "none")
    if layer_shuffle != "none" or OmegaConf.select(cfg, "eval.layer_order", default="sequential") == "random":
        with_layer_shuffle(model, layer_shuffle)  # the block order: random in training (a mode) / in eval (random)
    try:  # the scan backend this model runs on this device, decided now: a missing kernel fails here
        scan = describe_scan(model, device)
    except (CudaKernelsUnavailable, TritonUnavailable) as exc:
        raise UserError(str(exc)) from None
    if scan:
        log.info("%s: %s", name, scan)
    return model


def resolve_input_settings(data_cfg: DictConfig, model: nn.Module) -> None:
    """Fill the data settings left null (eval crop, resize interpolation, mean / std) from the
    model's ``pretrained_cfg`` through timm's ``resolve_data_config``, as timm's scripts do; what
    the config sets wins. Written back into ``data_cfg``, so the saved config says what ran."""
    given = {key: data_cfg.get(key) for key in INPUT_KEYS}
    resolved = resolve_data_config({**given, "input_size": (3, data_cfg.img_size, data_cfg.img_size)}, model=model)
    for key in INPUT_KEYS:
        if given[key] is None:
            value = resolved[key]
            data_cfg[key] = list(value) if isinstance(value, tuple) else value


@dataclass
class TrainData:
    """The loaders and on-device batch transforms of a training run, and its batch plan."""

    plan: BatchPlan
    train_loader: DataLoader
    train_sampler: ResumableTrainSampler
    val_loader: DataLoader
    train_transform: DeviceBatchTransform  # normalise, erase, mix
    eval_transform: DeviceBatchTransform  # normalise only

    @property
    def updates_per_epoch(self) -> int:
        return self.train_sampler.updates_per_epoch


def build_val_data(
    cfg: DictConfig, dist: DistInfo, batch_size: int | None = None
) -> tuple[DataLoader, DeviceBatchTransform]:
    """The validation loader (every image on exactly one rank) and its normalising transform;
    the same for the evaluation during training and for eval.py."""
    dataset = build_dataset(cfg.data, "val", build_eval_transform(cfg.data), is_main=dist.is_main)
    loader = build_eval_loader(dataset, cfg.data, dist.rank, dist.world_size, batch_size)
    return loader, DeviceBatchTransform(cfg.data, None, dist.device, cfg.data.num_classes)


def build_train_data(cfg: DictConfig, dist: DistInfo) -> TrainData:
    """Datasets, loaders, batch transforms and the batch plan; rank 0 builds the cached index
    first, the other ranks read it."""
    tcfg = cfg.trainer
    plan = plan_batches(tcfg, int(cfg.data.batch_size), dist.world_size)
    if not dist.is_main:
        barrier()
    train_set = build_dataset(cfg.data, "train", build_train_transform(cfg.data, cfg.aug), is_main=dist.is_main)
    val_loader, eval_transform = build_val_data(cfg, dist)
    if dist.is_main:
        barrier()
    train_loader, sampler = build_train_loader(
        train_set, cfg.data, cfg.aug, dist.rank, dist.world_size, plan.accum_steps, tcfg.seed,
        max_updates=tcfg.max_steps_per_epoch,
    )  # fmt: skip
    return TrainData(
        plan=plan,
        train_loader=train_loader,
        train_sampler=sampler,
        val_loader=val_loader,
        train_transform=DeviceBatchTransform(cfg.data, cfg.aug, dist.device, cfg.data.num_classes),
        eval_transform=eval_transform,
    )


def build_criterion(aug_cfg: DictConfig) -> nn.Module:
    """Soft-target CE when mixup/cutmix produce soft labels (smoothing is folded into them),
    else label-smoothing CE, else plain CE."""
    if mixup_active(aug_cfg):
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
