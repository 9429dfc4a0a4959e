"""Datasets: ImageNet-style folders (cached, array-backed index), the embedded digits demo,
and synthetic images. Every dataset yields (PIL image, label) to the transform.

Items are requested as ``(index, seed)`` pairs (see :mod:`shufflemamba.data.samplers`): the
worker seeds python/numpy/torch from ``seed`` before transforming, so an image's
augmentation depends only on (run seed, epoch, position) and never on which worker loads
it; that is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ..errors import UserError
from ..rng import preserved_rng, seed_all

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class _SeededDataset(Dataset):
    """Base: ``ds[(index, seed)]`` seeds, loads, transforms; ``ds[index]`` skips seeding."""

    transform: Any = None

    def load(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def name_of(self, index: int) -> str:
        return f"#{index}"

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            return self._load_transformed(index)
        # In a worker the generators are the worker's own; with num_workers=0 samples load in
        # the main process, whose RNG stream must stay untouched.
        with preserved_rng(enabled=get_worker_info() is None):
            seed_all(int(seed))
            return self._load_transformed(index)

    def _load_transformed(self, index: int):
        try:
            img, label = self.load(index)
            img = img.convert("RGB")  # grayscale, CMYK, palette, alpha -> RGB
        except Exception as exc:  # unreadable file: skipped by the collate, counted by the loop
            log.warning("skipping undecodable image %s (%s: %s)", self.name_of(index), type(exc).__name__, exc)
            return None, self.name_of(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class ImageFolderIndex:
    """The file list of one split, as numpy arrays (no per-worker copies of Python tuples).

    Listing 1.28M files takes minutes on network filesystems, so the list is cached in
    ``cache_dir`` keyed by the split's absolute path; rank 0 builds it, the others read it.
    """

    def __init__(self, root: Path, classes: list[str], rel_paths: np.ndarray, labels: np.ndarray) -> None:
        self.root, self.classes, self.rel_paths, self.labels = root, classes, rel_paths, labels

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def scan(cls, root: Path) -> ImageFolderIndex:
        if not root.is_dir():
            raise UserError(f"dataset folder not found: {root}")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        paths, labels = [], []
        for label, name in enumerate(classes):
            for dirpath, _, files in os.walk(root / name, followlinks=True):
                rel = os.path.relpath(dirpath, root)
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        paths.append(os.path.join(rel, f))
                        labels.append(label)
        if not paths:
            raise UserError(f"no images found under {root} (expected {root}/<class>/<image>)")
        return cls(root, classes, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int32))

    @classmethod
    def load_or_scan(cls, root: Path, cache_dir: Path, refresh: bool = False, write: bool = True) -> ImageFolderIndex:
        root = root.resolve()
        key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
        cache = cache_dir / f"index-{root.name}-{key}.npz"
        if cache.is_file() and not refresh:
            with np.load(cache, allow_pickle=False) as z:
                return cls(root, [str(c) for c in z["classes"]], z["paths"], z["labels"])
        index = cls.scan(root)
        if write:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, classes=np.array(index.classes), paths=index.rel_paths, labels=index.labels)
            os.replace(tmp, cache)
        return index


class FolderDataset(_SeededDataset):
    def __init__(self, index: ImageFolderIndex, transform: Any = None) -> None:
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def name_of(self, index: int) -> str:
        return str(self.index.root / self.index.rel_paths[index].decode())

    def load(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.name_of(index)) as img:
            img.load()
            return img, int(self.index.labels[index])


class DigitsDataset(_SeededDataset):
    """scikit-learn's 8x8 handwritten digits (1,797, shipped in the package), upscaled to RGB.

    A fixed stratified split (seed 0) gives ``val_fraction`` of each class to validation.
    """

    def __init__(self, split: str, img_size: int, val_fraction: float = 0.2, transform: Any = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        idx = np.arange(len(images))
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=0, stratify=digits.target)
        keep = np.sort(train_idx if split == "train" else val_idx)
        up = torch.nn.functional.interpolate(
            torch.from_numpy(images[keep]).float().unsqueeze(1), size=(img_size, img_size), mode="bilinear"
        )
        self.images = up.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
        self.labels = digits.target[keep].astype(np.int64)
        self.transform = transform
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


class FakeDataset(_SeededDataset):
    """Random-noise images with labels ``index % num_classes``; each image fixed by its index."""

    def __init__(self, size: int, img_size: int, num_classes: int, transform: Any = None, offset: int = 0) -> None:
        self.size, self.img_size, self.num_classes = size, img_size, num_classes
        self.transform, self.offset = transform, offset

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng(self.offset + index)
        pixels = rng.integers(0, 256, (self.img_size, self.img_size, 3), dtype=np.uint8)
        return Image.fromarray(pixels), index % self.num_classes


def build_dataset(data_cfg: Any, split: str, transform: Any, is_main: bool = True) -> _SeededDataset:
    """The ``split`` ("train" or "val") of the dataset named by ``data.kind``."""
    kind = data_cfg.kind
    if kind == "demo":
        return DigitsDataset(split, data_cfg.img_size, data_cfg.get("val_fraction", 0.2), transform)
    if kind == "fake":
        size = data_cfg.num_train if split == "train" else data_cfg.num_val
        offset = 0 if split == "train" else 10**9
        return FakeDataset(size, data_cfg.img_size, data_cfg.num_classes, transform, offset=offset)
    if kind == "imagenet":
        if OmegaConf.is_missing(data_cfg, "root") or data_cfg.root in (None, ""):
            raise UserError("data.root is not set: pass data.root=/path/to/imagenet (with train/ and val/ inside)")
        root = Path(data_cfg.root).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset root not found: {root}")
        cache_dir = Path(data_cfg.get("index_cache_dir") or Path.home() / ".cache" / "shufflemamba")
        index = ImageFolderIndex.load_or_scan(
            root / split, cache_dir, refresh=bool(data_cfg.get("refresh_index", False)), write=is_main
        )
        if len(index.classes) != data_cfg.num_classes:
            raise UserError(
                f"{root / split} has {len(index.classes)} class folders but data.num_classes={data_cfg.num_classes}"
            )
        return FolderDataset(index, transform)
    raise UserError(f"unknown data.kind {kind!r}: use imagenet, demo or fake")
