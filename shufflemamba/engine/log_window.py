"""The training numbers between two log rows, and over the epoch.

Loss sums and counts stay on the device (no host sync per micro-batch); they are summed over
ranks only when a row is written. The trainer adds to the window and asks for rows; it keeps no
sums or timers of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed as D


@dataclass
class EpochStats:
    loss: float  # mean finite training loss over the epoch's micro-batches (all ranks)
    images_per_sec: float
    seconds: float
    skipped_images: int  # undecodable images (all ranks)
    skipped_batches: int  # micro-batches in which no image could be decoded (all ranks)


class LogWindow:
    """Sums of one epoch's training, and of the part since the last row."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device, self.world_size = device, world_size
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, finite micro-batches
        self.epoch = torch.zeros(2, dtype=torch.float64, device=device)
        self.aux: Tensor | None = None  # LayerShuffle "predict": the slot loss summed over the window
        self.window_images = self.epoch_images = 0
        self.skipped_images = self.skipped_batches = 0
        self.epoch_start = self.window_start = time.perf_counter()

    def add(self, loss: Tensor, finite: Tensor, images: int, counts: bool = True, aux: Tensor | None = None) -> None:
        """One micro-batch: its loss (counted when finite, and when ``counts``: a blank stand-in
        for an empty micro-batch does not), its number of images, and an auxiliary loss logged apart."""
        weight = 1.0 if counts else 0.0
        self.window += torch.stack([torch.where(finite, loss.detach().double(), 0.0), finite.double() * weight])
        if aux is not None:
            aux = torch.where(finite, aux.detach().double(), 0.0)
            self.aux = aux if self.aux is None else self.aux + aux
        self.window_images += images

    def skipped(self, images: int, batches: int = 0) -> None:
        self.skipped_images += images
        self.skipped_batches += batches

    def row(self, **fields: Any) -> dict[str, Any]:
        """Close the window: its mean loss over all ranks and images/s, with ``fields``; a collective."""
        elapsed = time.perf_counter() - self.window_start
        loss_sum, count = D.all_reduce_sum(self.window, self.device)
        self.epoch += self.window
        img_s = self.window_images * self.world_size / max(elapsed, 1e-9)
        self.window.zero_()
        self.epoch_images += self.window_images
        self.window_start, self.window_images = time.perf_counter(), 0
        row = {"split": "train", **fields, "loss": loss_sum / max(count, 1), "img_per_sec": img_s}
        if self.aux is not None:
            row["layer_order_loss"] = D.all_reduce_sum(self.aux.view(1), self.device)[0] / max(count, 1)
            self.aux = None
        return row

    def epoch_stats(self) -> EpochStats:
        """The epoch's totals over all ranks; a collective."""
        seconds = time.perf_counter() - self.epoch_start
        skips = torch.tensor([float(self.skipped_images), float(self.skipped_batches)], dtype=torch.float64)
        loss_sum, count, images, batches = D.all_reduce_sum(torch.cat([self.epoch, skips.to(self.device)]), self.device)
        return EpochStats(
            loss=loss_sum / max(count, 1),
            images_per_sec=self.epoch_images * self.world_size / max(seconds, 1e-9),
            seconds=seconds,
            skipped_images=int(images),
            skipped_batches=int(batches),
        )
