"""Process-group setup from torchrun's environment, and the few collectives the loop needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda")  # trainer.device / eval.device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (torchrun, also multi-node) and join the group:
    NCCL on GPU, gloo on CPU. Without torchrun: a single process."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but torch sees no GPU; use trainer.device=cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo",
            timeout=timeout,
            device_id=dev if want_cuda else None,
            **_restart_safe_store(rank, world, timeout),
        )
    return DistInfo(rank, local_rank, world, dev)


def _restart_safe_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, a process-group store namespaced by the restart count.

    After ``--max-restarts`` restarts the group, the agent's store can still hold the
    previous round's gloo addresses; a new rank that reads one before it is overwritten
    connects to a dead process ("connectFullMesh failed ... Connection refused").
    Keys prefixed per round cannot be stale. Outside torchrun: plain env:// init.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return {}
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_hosts,
        timeout=timeout,
    )
    return {"store": dist.PrefixStore(f"shufflemamba/round{restart}", base), "rank": rank, "world_size": world}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: Tensor | list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact); one host sync to read them."""
    t = (
        values.to(device, torch.float64)
        if isinstance(values, Tensor)
        else torch.tensor(values, dtype=torch.float64, device=device)
    )
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flags: Tensor | list[bool], device: torch.device) -> list[bool]:
    """Logical OR of each flag over ranks, in one collective (every rank gets the same answer).

    Flags may already live on the device (no host sync until the answer is read)."""
    t = (
        flags.to(device, torch.float32)
        if isinstance(flags, Tensor)
        else torch.tensor([float(f) for f in flags], device=device)
    )
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj):
    """Every rank's ``obj`` as a list indexed by rank (a 1-element list without a group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
