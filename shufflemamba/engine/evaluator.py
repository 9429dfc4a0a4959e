"""Evaluation: the accuracy pass over a validation loader (used by training every epoch), and
scoring a checkpoint file (ours or an official Vim / ShuffleMamba / VMamba / timm file) with
eval.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import load_weights, read_checkpoint, uses_ema, weights_choice
from ..config import validate
from ..data.datasets import build_dataset
from ..data.loader import DeviceBatchTransform, build_eval_loader, release_workers
from ..data.transforms import build_eval_transform
from ..errors import CheckpointError, UserError
from . import distributed as D
from .builders import build_model, resolve_precision
from .tracking import setup_logging

log = logging.getLogger("shufflemamba")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    batch_transform: DeviceBatchTransform,
    autocast: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over this rank's shard, summed over ranks.

    Call with the unwrapped module: shards differ in length, and DDP's forward would
    wait for the other ranks.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, count
    start = time.perf_counter()
    for images, labels, failed in loader:
        for name in failed:
            log.warning("skipped undecodable image: %s", name)
        if images.numel() == 0:
            continue
        images, labels = batch_transform(images, labels)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[3] += labels.shape[0]
    if dist.is_initialized():
        dist.all_reduce(sums)
    seconds = time.perf_counter() - start
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "loss": loss / n,
        "num_images": int(sums[3].item()),
        "images_per_sec": sums[3].item() / max(seconds, 1e-9),
        "correct1": int(c1),
    }


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """eval.py: load ``cfg.checkpoint`` into ``cfg.model`` and score it on ``cfg.data``'s val split."""
    validate(cfg)
    dist_info = D.init_distributed(cfg.eval.device)
    setup_logging(None, dist_info.is_main)
    try:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise UserError("checkpoint is not set: pass checkpoint=/path/to/best.pt")
        checkpoint = read_checkpoint(cfg.checkpoint)
        use_ema = weights_choice(checkpoint, cfg.eval.ema)
        model = build_model(cfg, dist_info.device)
        try:
            load_weights(model, checkpoint, use_ema=use_ema)
        except CheckpointError as exc:
            raise CheckpointError(f"{cfg.checkpoint}: {exc}") from None
        dataset = build_dataset(cfg.data, "val", build_eval_transform(cfg.data), is_main=dist_info.is_main)
        loader = build_eval_loader(dataset, cfg.data, dist_info.rank, dist_info.world_size, cfg.eval.batch_size)
        transform = DeviceBatchTransform(cfg.data, None, dist_info.device, cfg.data.num_classes)
        amp = resolve_precision(cfg.eval.precision, dist_info.device)

        def autocast():
            return torch.autocast(dist_info.device.type, dtype=amp, enabled=amp is not None)

        try:
            result = evaluate(model, loader, transform, autocast, dist_info.device)
        finally:
            release_workers(loader)
        result.pop("correct1")
        result.update(
            checkpoint=str(cfg.checkpoint),
            weights="ema" if uses_ema(checkpoint, use_ema) else "raw",
            model=cfg.model.name,
            img_size=cfg.data.img_size,
            crop_pct=cfg.data.crop_pct,
            world_size=dist_info.world_size,
        )
        if dist_info.is_main:
            text = json.dumps(result, indent=2)
            print(text)
            if cfg.output:
                Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.output).write_text(text + "\n")
        return result
    finally:
        D.cleanup()
