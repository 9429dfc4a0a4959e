"""Process random state: seeding, and capture / restore for exact resume.

A leaf module because two layers need it: the data workers seed python / numpy / torch per
sample (an image's augmentation depends only on its sample seed, never on the worker that
loads it), and the trainer seeds each rank and checkpoints every generator's state.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed this process's python, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states, as plain data
    (tensors and containers, so a checkpoint holding it loads with ``weights_only=True``)."""
    mt_name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": mt_name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derive_seed(*key: int) -> int:
    """A 63-bit seed that depends on ``key`` only (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1


@contextlib.contextmanager
def keyed_rng(*key: int) -> Iterator[None]:
    """Run the block with python / numpy / torch (CPU and this CUDA device) generators seeded from
    ``key`` alone, and every generator back as it was afterwards: draws inside depend on the key,
    not on the process (e.g. a micro-batch's mixup on whichever rank computes it)."""
    saved = capture_rng()
    seed_all(derive_seed(*key))
    try:
        yield
    finally:
        restore_rng(saved)


@contextlib.contextmanager
def preserved_rng(enabled: bool = True) -> Iterator[None]:
    """Leave python / numpy / torch generators as they were on exit (no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
