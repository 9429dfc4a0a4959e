"""DataLoaders and the batch work done on the device (normalise, erase, mix)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .samplers import ResumableTrainSampler, ShardedEvalSampler

ERASE_MODES = ("pixel", "rand", "const")  # timm's RandomErasing modes (aug.remode)
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup modes (aug.mixup_mode)


def mixup_active(aug_cfg: Any | None) -> bool:
    """Whether training mixes images and labels (mixup / cutmix): the one rule for both the batch
    transform and the loss (soft targets)."""
    return aug_cfg is not None and (aug_cfg.mixup > 0 or aug_cfg.cutmix > 0 or aug_cfg.cutmix_minmax is not None)


def collate_uint8(batch: list[tuple[Any, Any]]) -> tuple[Tensor, Tensor, list[str]]:
    """Stack uint8 CHW images; drop items the dataset could not decode, returning their names."""
    good = [(img, label) for img, label in batch if img is not None]
    failed = [name for img, name in batch if img is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), failed
    images = torch.stack([torch.as_tensor(np.asarray(img, dtype=np.uint8)) for img, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, failed


def _loader(dataset: Dataset, sampler, batch_size: int, data_cfg: Any, drop_last: bool, seed: int) -> DataLoader:
    workers = int(data_cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_uint8,
        pin_memory=bool(data_cfg.pin_memory) and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        # A private generator: creating an iterator never consumes the global torch RNG,
        # so a resumed run's RNG stream matches an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers > 0 else None,
    )


def release_workers(*loaders: DataLoader) -> None:
    """Stop the loaders' persistent worker processes now, while the interpreter is intact.

    With ``persistent_workers`` and ``pin_memory`` (our GPU setting), torch registers an atexit
    join of every worker with a 5 s timeout but never tells them to stop first (pytorch#81794):
    with a train and a val loader of 12 workers each, every train.py on GPU sat 2 minutes after
    its last log line (measured on the H100). Shutting the iterator down sends each worker its
    stop signal, so the atexit joins return at once.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


def build_train_loader(
    dataset: Dataset,
    data_cfg: Any,
    aug_cfg: Any,
    rank: int,
    world: int,
    accum_steps: int,
    seed: int,
    max_updates: int | None = None,
) -> tuple[DataLoader, ResumableTrainSampler]:
    """The training loader (one micro-batch per item) and its world-size-independent sampler."""
    sampler = ResumableTrainSampler(
        len(dataset),
        int(data_cfg.batch_size),
        rank,
        world,
        accum_steps=accum_steps,
        repeats=int(aug_cfg.repeated_aug),
        seed=seed,
        max_updates=max_updates,
    )
    return _loader(dataset, sampler, int(data_cfg.batch_size), data_cfg, drop_last=True, seed=seed), sampler


def build_eval_loader(dataset: Dataset, data_cfg: Any, rank: int, world: int, batch_size: int | None = None):
    sampler = ShardedEvalSampler(len(dataset), rank, world)
    return _loader(dataset, sampler, int(batch_size or data_cfg.batch_size), data_cfg, drop_last=False, seed=0)


class DeviceBatchTransform:
    """uint8 batch -> normalised float batch on the device; for training also random erasing
    and mixup/cutmix (label smoothing folded into the soft targets), all with timm's ops."""

    def __init__(self, data_cfg: Any, aug_cfg: Any | None, device: torch.device, num_classes: int) -> None:
        self.device = device
        self.mean = torch.tensor(data_cfg.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data_cfg.std, device=device).view(1, -1, 1, 1) * 255
        self.erasing = self.mixup = None
        if aug_cfg is not None and aug_cfg.reprob > 0:
            self.erasing = RandomErasing(
                aug_cfg.reprob, mode=aug_cfg.remode, max_count=aug_cfg.recount, device=str(device)
            )
        if mixup_active(aug_cfg):
            self.mixup = Mixup(
                mixup_alpha=aug_cfg.mixup,
                cutmix_alpha=aug_cfg.cutmix,
                cutmix_minmax=aug_cfg.cutmix_minmax,
                prob=aug_cfg.mixup_prob,
                switch_prob=aug_cfg.mixup_switch_prob,
                mode=aug_cfg.mixup_mode,
                label_smoothing=aug_cfg.smoothing,
                num_classes=num_classes,
            )

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        labels = labels.to(self.device, non_blocking=True)
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's mixup needs an even batch (odd only after skipped images)
                images, labels = images[:-1], labels[:-1]
            images, labels = self.mixup(images, labels)
        return images, labels
