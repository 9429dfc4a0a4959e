"""Samplers: resumable repeated-augmentation training order and exact sharded evaluation.

Our training sampler does what DeiT's RASampler / timm's RepeatAugSampler do (each image
``repeats`` times per epoch, the copies spread over ranks, the epoch kept at the dataset's
length) and two things they cannot: it restarts mid-epoch at any batch, and it hands each
sample a seed so augmentation does not depend on worker scheduling. Both are needed for
bitwise-exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UserError


class ResumableTrainSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)`` for this rank; the order is a function of (seed, epoch) only."""

    def __init__(
        self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1, repeats: int = 1, seed: int = 0
    ) -> None:
        if dataset_len < world_size * batch_size:
            raise UserError(
                f"{dataset_len} training images cannot fill one batch of {batch_size} on each of {world_size} "
                f"rank(s): lower data.batch_size to at most {max(dataset_len // world_size, 1)} or add images"
            )
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.repeats, self.seed = max(1, int(repeats)), seed
        self.epoch, self.start_batch = 0, 0
        # Every rank takes the same number of full batches (DDP needs equal step counts).
        self.batches_per_epoch = dataset_len // world_size // batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` skips batches already trained (mid-epoch resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.dataset_len, generator=g)
        if self.repeats > 1:  # consecutive copies land on consecutive ranks, as in DeiT
            perm = perm.repeat_interleave(self.repeats)
        seeds = torch.randint(0, 2**62, (len(perm),), generator=g)
        return perm, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm, seeds = self._order()
        mine = slice(self.rank, None, self.world_size)
        perm, seeds = perm[mine], seeds[mine]
        start, stop = self.start_batch * self.batch_size, self.batches_per_epoch * self.batch_size
        yield from zip(perm[start:stop].tolist(), seeds[start:stop].tolist(), strict=True)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


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
