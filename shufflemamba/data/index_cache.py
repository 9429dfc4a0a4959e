"""The on-disk cache of dataset indexes (file lists, tar member offsets), shared by every format.

Building an index means touching every file or tar header of a split: minutes for ImageNet on
a network filesystem, repeated by every rank. It is built once (rank 0), written atomically as
a numpy ``.npz`` (arrays, no pickle: nothing executable is loaded back, and 1.28M entries load
in well under a second), and read by every later run and rank.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

# Bump when the layout of a cached index changes: old files are then simply not found.
INDEX_VERSION = 2


def default_cache_dir(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shufflemamba"


def cache_file(cache_dir: Path, kind: str, root: Path, *parts: str) -> Path:
    """The cache file of one split's index: named after the data's root, keyed by everything that
    decides its content (format, absolute root, split files)."""
    key = hashlib.sha1("\0".join([str(INDEX_VERSION), kind, str(root), *parts]).encode()).hexdigest()[:16]
    return cache_dir / f"{kind}-{root.name}-{key}.npz"


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when there is no readable cache file."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError):  # a torn or foreign file: rebuild rather than fail
        return None


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
