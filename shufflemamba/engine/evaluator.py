"""Score a checkpoint (ours or an official Vim / ShuffleMamba file) on the val split."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import CheckpointError, load_weights, read_checkpoint, uses_ema
from ..config import UserError
from ..data.datasets import build_dataset
from ..data.loader import DeviceBatchTransform, build_eval_loader, release_workers
from ..data.transforms import build_eval_transform
from . import distributed as D
from .loop import evaluate
from .tracking import setup_logging
from .trainer import build_model, resolve_precision

log = logging.getLogger("shufflemamba")


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    dist_info = D.init_distributed(cfg.trainer.device)
    setup_logging(None, dist_info.is_main)
    try:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise UserError("checkpoint is not set: pass checkpoint=/path/to/best.pt")
        try:
            checkpoint = read_checkpoint(cfg.checkpoint)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        use_ema = cfg.eval.ema
        if use_ema is None and checkpoint.get("best_weights") in ("ema", "raw"):
            use_ema = checkpoint["best_weights"] == "ema"
        model = build_model(cfg, dist_info.device)
        try:
            load_weights(model, checkpoint, use_ema=use_ema)
        except CheckpointError as exc:
            raise UserError(f"{cfg.checkpoint}: {exc}") from None
        dataset = build_dataset(cfg.data, "val", build_eval_transform(cfg.data), is_main=dist_info.is_main)
        loader = build_eval_loader(dataset, cfg.data, dist_info.rank, dist_info.world_size, cfg.eval.batch_size)
        transform = DeviceBatchTransform(cfg.data, None, dist_info.device, cfg.data.num_classes)
        amp = resolve_precision(cfg.trainer.precision, dist_info.device)

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
