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
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ..checkpoint import load_weights, read_checkpoint
from ..data.loader import DeviceBatchTransform, release_workers
from ..errors import CheckpointError, UserError
from ..models.layer_shuffle import layer_shuffles
from ..models.shuffle import token_shuffle_at_inference
from ..rng import keyed_rng
from . import distributed as D
from .builders import autocast_factory, build_model, build_val_data, resolve_input_settings
from .choices import validate
from .tracking import setup_logging

log = logging.getLogger("shufflemamba")


BLOCK_ORDER_KEY = 1_000_003  # keys the plain pass's draws apart from the Monte-Carlo passes' (0..K-1)


def check_shuffle_samples(model: nn.Module, shuffle_samples: int) -> None:
    """``eval.shuffle_samples``: 1 (off) or K > 1 passes with the model's token shuffle, which
    then must exist; checked when a run starts, not after its first epoch."""
    if shuffle_samples < 1:
        raise UserError(f"eval.shuffle_samples={shuffle_samples}: use 1 (off) or more passes")
    if shuffle_samples > 1:
        with token_shuffle_at_inference(model) as active:
            if not active:
                raise UserError(
                    f"eval.shuffle_samples={shuffle_samples} averages passes with the token shuffle on, but this "
                    f"model has none (shuffle_rate 0, or a family without it); use eval.shuffle_samples=1"
                )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    batch_transform: DeviceBatchTransform,
    autocast: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
    shuffle_samples: int = 1,
    seed: int = 0,
    layer_order: str = "sequential",
) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over this rank's shard, summed over ranks.

    With ``shuffle_samples`` K > 1 also the Monte-Carlo figures (``mc_top1``, ``mc_top5``): the
    softmax averaged over K passes with the model's training-time token shuffle active, each pass's
    draws seeded by (seed, rank, batch, pass) and the process's generators left untouched, so the
    figures are reproducible and training resumes exactly. ``layer_order="random"``: every pass runs
    the blocks in a random order (LayerShuffle's robustness measure), one seeded order per batch.
    Call with the unwrapped module: shards differ in length, and DDP's forward would wait for the
    other ranks.
    """
    model.eval()
    check_shuffle_samples(model, shuffle_samples)
    monte_carlo = shuffle_samples > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    orders = layer_shuffles(model)
    if layer_order == "random" and not orders:
        raise UserError("eval.layer_order=random: this model has no LayerShuffle to reorder its blocks")
    for shuffle in orders:
        shuffle.random_order = layer_order == "random"
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # correct1, correct5, loss, count, mc1, mc5, mc loss
    start = time.perf_counter()
    for batch, (images, labels, failed) in enumerate(loader):
        for name in failed:
            log.warning("skipped undecodable image: %s", name)
        if images.numel() == 0:
            continue
        images, labels = batch_transform(images, labels)
        order_draw = keyed_rng(seed, rank, batch, BLOCK_ORDER_KEY) if orders else contextlib.nullcontext()
        with order_draw, autocast():  # a random block order: seeded per rank and batch
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[3] += labels.shape[0]
        if monte_carlo:
            probs = torch.zeros_like(logits)
            with token_shuffle_at_inference(model):
                for sample in range(shuffle_samples):
                    with keyed_rng(seed, rank, batch, sample), autocast():
                        probs += model(images).float().softmax(dim=1)
            probs /= shuffle_samples
            hits = probs.topk(k, dim=1).indices == labels[:, None]
            sums[4] += hits[:, 0].sum()
            sums[5] += hits.any(dim=1).sum()
            sums[6] += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double()
    for shuffle in orders:
        shuffle.random_order = False
    if dist.is_initialized():
        dist.all_reduce(sums)
    seconds = time.perf_counter() - start
    c1, c5, loss, n, mc1, mc5, mc_loss = sums.tolist()
    n = max(n, 1.0)
    result = {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "loss": loss / n,
        "num_images": int(sums[3].item()),
        "images_per_sec": sums[3].item() / max(seconds, 1e-9),
        "correct1": int(c1),
    }
    if monte_carlo:
        result.update(mc_top1=100.0 * mc1 / n, mc_top5=100.0 * mc5 / n, mc_loss=mc_loss / n,
                      shuffle_samples=shuffle_samples)  # fmt: skip
    return result


# What a checkpoint's own config decides for eval.py unless the command line says otherwise:
# the model, and the input it was trained on.
INPUT_KEYS = ("img_size", "num_classes", "crop_pct", "interpolation", "mean", "std")


def adopt_checkpoint_config(cfg: DictConfig, saved: dict[str, Any], command_line: list[str]) -> list[str]:
    """Take the model and its input settings from the config a checkpoint was trained with
    (``saved``), then the command line's ``model.*`` / ``data.*`` overrides on top; a ``model=``
    choice on the command line keeps that model config instead. Returns what was taken."""
    overrides = OverridesParser.create().parse_overrides(command_line)
    given = {o.key_or_group.lstrip("+~") for o in overrides}
    taken = []
    with open_dict(cfg):
        if "model" not in given and isinstance(saved.get("model"), dict):
            model = {k: v for k, v in saved["model"].items() if k != "crop_pct"}  # crop_pct: older configs
            links = OmegaConf.to_container(cfg.model, resolve=False)
            for key, value in links.items():  # img_size: ${data.img_size} and the like stay links to data.*
                if key in model and isinstance(value, str) and value.startswith("${data."):
                    model[key] = value
            cfg.model = OmegaConf.create(model)
            for o in overrides:
                if o.key_or_group.lstrip("+").startswith("model.") and not o.is_delete():
                    OmegaConf.update(cfg, o.key_or_group.lstrip("+"), o.value(), force_add=True)
            taken.append(f"model {cfg.model.name}")
        for key in INPUT_KEYS:
            if f"data.{key}" not in given and key in saved.get("data", {}):
                cfg.data[key] = saved["data"][key]
                taken.append(f"data.{key}={saved['data'][key]}")
    return taken


def run_eval(cfg: DictConfig, command_line: list[str] | None = None) -> dict[str, Any]:
    """eval.py: load ``cfg.checkpoint`` and score it on ``cfg.data``'s val split. The model and its
    input settings come from the checkpoint's config when it has one (ours), with
    ``command_line``'s overrides on top; official files use ``cfg.model`` / ``cfg.data``."""
    validate(cfg)  # the command line's choices, before anything starts
    dist_info = D.init_distributed(cfg.eval.device)
    setup_logging(None, dist_info.is_main)
    try:
        path = cfg.get("checkpoint") if not OmegaConf.is_missing(cfg, "checkpoint") else None
        if not isinstance(path, str) or not path:
            raise UserError("checkpoint is not set: pass checkpoint=/path/to/best.pt")
        checkpoint = read_checkpoint(path)
        if isinstance(checkpoint.get("config"), dict):
            taken = adopt_checkpoint_config(cfg, checkpoint["config"], command_line or [])
            log.info("from the checkpoint's config: %s", ", ".join(taken))
            validate(cfg)
        model = build_model(cfg, dist_info.device)
        check_shuffle_samples(model, cfg.eval.shuffle_samples)
        resolve_input_settings(cfg.data, model)
        try:
            weights = load_weights(model, checkpoint, use_ema=cfg.eval.ema)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        loader, transform = build_val_data(cfg, dist_info, cfg.eval.batch_size)
        autocast = autocast_factory(cfg.eval.precision, dist_info.device)
        try:
            result = evaluate(model, loader, transform, autocast, dist_info.device, cfg.eval.shuffle_samples,
                              cfg.eval.seed, cfg.eval.layer_order)  # fmt: skip
        finally:
            release_workers(loader)
        result.pop("correct1")
        result.update(
            checkpoint=str(path),
            weights=weights,
            model=cfg.model.name,
            img_size=cfg.data.img_size,
            crop_pct=cfg.data.crop_pct,
            layer_order=cfg.eval.layer_order,
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
