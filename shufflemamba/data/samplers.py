"""Samplers: a training order that does not depend on the world size, and exact sharded evaluation.

The training sampler does what DeiT's RASampler / timm's RepeatAugSampler do (each image
``repeats`` times per epoch, the epoch kept at the dataset's length) and three things they
cannot:

- **The global batch, not the rank, defines the data.** One order per (seed, epoch) is cut into
  global batches of ``G = micro_batch x world_size x accum`` samples; optimizer step ``k`` trains
  on samples ``[k G, (k + 1) G)`` of it whatever the number of ranks, and each micro-batch is a
  fixed slice of that block (micro-batch ``m`` of rank ``r`` is slice ``m x world + r``). Every
  sample carries its own augmentation seed, so for a given seed and global batch the images of
  each step, and their augmentation, are the same on 1, 2 or 8 ranks.
- **Resume at any sample**: ``set_epoch(epoch, start_sample)`` restarts mid-epoch, on any world
  size (the position is counted in samples, not in per-rank batches).
- Each sample comes as ``(index, seed)``, so augmentation never depends on worker scheduling.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UserError


class ResumableTrainSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(index, seed)`` pairs, micro-batch after micro-batch, for the epoch."""

    def __init__(
        self,
        dataset_len: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        repeats: int = 1,
        seed: int = 0,
        max_updates: int | None = None,
    ) -> None:
        self.global_batch = micro_batch * world_size * accum_steps
        if dataset_len < self.global_batch:
            raise UserError(
                f"{dataset_len} training images cannot fill one global batch of {self.global_batch} "
                f"({micro_batch} per micro-batch x {world_size} rank(s) x {accum_steps} accumulation step(s)): "
                f"lower trainer.global_batch or data.batch_size, or add images"
            )
        self.dataset_len, self.micro_batch = dataset_len, micro_batch
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.repeats, self.seed = max(1, int(repeats)), seed
        self.epoch, self.start_sample = 0, 0
        self.max_updates = max_updates  # cap on optimizer updates per epoch (smoke / throughput runs)

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer updates in a whole epoch (all ranks take the same number)."""
        updates = self.dataset_len // self.global_batch
        return updates if self.max_updates is None else min(updates, self.max_updates)

    @property
    def updates_done(self) -> int:
        """Updates of the epoch already trained before ``start_sample``."""
        return self.start_sample // self.global_batch

    @property
    def updates_left(self) -> int:
        """Updates left in the epoch from ``start_sample``."""
        return max(0, self.updates_per_epoch - self.updates_done)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Select the epoch; ``start_sample`` skips the samples (all ranks together) already trained."""
        self.epoch, self.start_sample = epoch, start_sample

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's global order of dataset indices and their augmentation seeds: a function of
        (seed, epoch) only; consecutive copies of an image (repeated augmentation) share a step."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.dataset_len, generator=g)
        if self.repeats > 1:
            perm = perm.repeat_interleave(self.repeats)[: self.dataset_len]
        seeds = torch.randint(0, 2**62, (len(perm),), generator=g)
        return perm, seeds

    def micro_batch_offset(self, i: int) -> int:
        """Position in the epoch's global order of this rank's ``i``-th micro-batch (from
        ``start_sample``): the key of its batch-level augmentation, the same on any world size."""
        step, m = divmod(i, self.accum_steps)
        return self.start_sample + step * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm, seeds = self.epoch_order()
        for i in range(self.updates_left * self.accum_steps):
            start = self.micro_batch_offset(i)
            stop = start + self.micro_batch
            yield from zip(perm[start:stop].tolist(), seeds[start:stop].tolist(), strict=True)

    def __len__(self) -> int:
        return self.updates_left * self.accum_steps * self.micro_batch


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every image on exactly one rank, no padding.

    Shards differ in length by at most one; the evaluation sums counts across ranks, so
    the accuracy is exactly that of a single-process run.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
