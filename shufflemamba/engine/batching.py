"""The batch arithmetic of a run, done once: micro-batch x processes x accumulation = global batch.

A recipe is defined by its global batch (``trainer.global_batch``); the number of processes is
whatever the cluster gives. :func:`plan_batches` derives the accumulation from them (or takes
``trainer.grad_accum_steps`` when no global batch is set), refuses what does not divide with
the nearest valid micro-batch, and returns a frozen :class:`BatchPlan` that everything else
reads: the sampler's cut of the epoch, the lr scaling, the schedule's updates per epoch, the
resume check, the log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # images per process per forward (data.batch_size)
    world_size: int
    accum_steps: int  # micro-batches per optimizer update

    @property
    def global_batch(self) -> int:
        """Images per optimizer update, all processes together."""
        return self.micro_batch * self.world_size * self.accum_steps


def plan_batches(trainer_cfg: Any, micro_batch: int, world_size: int) -> BatchPlan:
    """The plan for ``data.batch_size`` = ``micro_batch`` on ``world_size`` processes: the
    accumulation derived from ``trainer.global_batch`` when set (so a recipe's global batch holds
    on any number of GPUs), else ``trainer.grad_accum_steps``."""
    accum, global_batch = int(trainer_cfg.grad_accum_steps), trainer_cfg.get("global_batch")
    if accum < 1:
        raise UserError("trainer.grad_accum_steps must be >= 1")
    if global_batch is None:
        return BatchPlan(micro_batch, world_size, accum)
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
    return BatchPlan(micro_batch, world_size, derived)
