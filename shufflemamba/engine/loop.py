"""The training epoch and the evaluation, as plain functions (DeiT's engine.py, nanoGPT's step).

Every line of a step is here: device-side augmentation, autocast, accumulation, the
cross-rank agreement on non-finite losses and stop requests, clipping, the scaler,
the optimizer, EMA, the per-update lr, logging and periodic checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, any_rank

if TYPE_CHECKING:
    from .trainer import Run

log = logging.getLogger("shufflemamba")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, last.pt untouched since the last good step."""


class StopRequested(Exception):
    """SIGTERM/SIGINT (e.g. SLURM pre-emption): a checkpoint was written, the run exits."""


def train_one_epoch(run: Run, epoch: int, start_batch: int) -> dict[str, Any]:
    cfg, device = run.cfg, run.dist.device
    model, raw_model = run.train_model, run.model
    accum = run.accum_steps
    model.train()
    run.train_sampler.set_epoch(epoch, start_batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count, skipped_images, step_bad = 0, 0, False
    window_start, window_images = time.perf_counter(), 0
    batches = run.train_sampler.batches_per_epoch
    progress = run.progress(total=batches, initial=start_batch, desc=f"epoch {epoch}")

    for batch_idx, (images, labels, failed) in enumerate(run.train_loader, start=start_batch):
        for name in failed:
            log.warning("skipped undecodable image: %s", name)
        skipped_images += len(failed)
        images, labels = run.batch_transform(images, labels)
        is_update = (batch_idx + 1) % accum == 0
        no_sync = model.no_sync() if (run.dist.distributed and not is_update) else contextlib.nullcontext()
        with no_sync:
            with run.autocast():
                loss = run.criterion(model(images), labels)
            finite = bool(torch.isfinite(loss.detach()))
            step_bad |= not finite
            run.scaler.scale(loss / accum).backward()
        window_images += images.shape[0]
        if finite:
            loss_sum += loss.detach().double()
            loss_count += 1
        if not is_update:
            continue

        bad, stop = any_rank([step_bad, run.stop_requested], device)  # one rank's NaN skips the step everywhere
        step_bad = False
        if bad:
            run.optimizer.zero_grad(set_to_none=True)
            run.nonfinite_steps += 1
            run.consecutive_nonfinite += 1
            log.warning(
                "non-finite loss at update %d: step skipped (%d in a row, %d in total)",
                run.global_step,
                run.consecutive_nonfinite,
                run.nonfinite_steps,
            )
            if run.consecutive_nonfinite >= cfg.trainer.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{run.consecutive_nonfinite} consecutive non-finite losses; stopping. The last good "
                    f"checkpoint is {run.ckpt_dir / 'last.pt'} (try a lower lr, trainer.clip_grad, or bf16 over fp16)"
                )
        else:
            run.consecutive_nonfinite = 0
            if cfg.trainer.clip_grad:
                run.scaler.unscale_(run.optimizer)
                nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.trainer.clip_grad)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.update(raw_model, step=run.global_step)
        run.global_step += 1
        run.scheduler.step_update(num_updates=run.global_step)

        if run.global_step % cfg.trainer.log_every_steps == 0 or batch_idx + 1 == batches:
            elapsed = time.perf_counter() - window_start
            mean_loss, n = all_reduce_sum([loss_sum.item(), float(loss_count)], device)
            img_s = window_images * run.dist.world_size / max(elapsed, 1e-9)
            row = {
                "split": "train",
                "epoch": epoch,
                "step": run.global_step,
                "loss": mean_loss / max(n, 1),
                "lr": run.optimizer.param_groups[0]["lr"],
                "img_per_sec": img_s,
                "nonfinite_steps": run.nonfinite_steps,
            }
            run.metrics.write(row, step=run.global_step)
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{img_s:.0f}")
            loss_sum.zero_()
            loss_count, window_start, window_images = 0, time.perf_counter(), 0
        progress.update(1 if accum == 1 else accum)

        every = cfg.trainer.checkpoint_every_steps
        if stop or (every and run.global_step % every == 0 and run.consecutive_nonfinite == 0):
            run.save_checkpoint(epoch=epoch, step_in_epoch=batch_idx + 1)
        if stop:
            progress.close()
            raise StopRequested(f"stop requested: checkpoint written at epoch {epoch}, batch {batch_idx + 1}")
    progress.close()
    skipped = all_reduce_sum([float(skipped_images)], device)[0]
    if skipped:
        log.warning("epoch %d: %d undecodable images skipped", epoch, int(skipped))
    return {"skipped_images": int(skipped)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, batch_transform, autocast, device: torch.device) -> dict[str, float]:
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
