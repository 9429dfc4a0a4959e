"""Datasets: ImageNet as an ImageFolder, as tar shards or ILSVRC2012 tars read at random
(:mod:`~shufflemamba.data.tar_index`), or as Hugging Face Arrow / parquet files
(:mod:`~shufflemamba.data.hf`); the embedded digits demo; synthetic images. Every dataset yields
(PIL image, label) to the transform, and the file-backed ones decode the same bytes with the same
PIL call, so a sample's pixels do not depend on the format it is stored in.

Items are requested as ``(index, seed)`` pairs (see :mod:`shufflemamba.data.samplers`): the
worker seeds python/numpy/torch from ``seed`` before transforming, so an image's
augmentation depends only on (run seed, epoch, position) and never on which worker loads
it; that is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ..errors import UserError
from ..rng import preserved_rng, seed_all
from . import tar_index as T
from .index_cache import cache_file, default_cache_dir, load_arrays, save_arrays
from .tar_index import TarIndex

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
        except Exception as exc:  # unreadable: the collate drops it, the loop logs this line and counts it
            return None, f"{self.name_of(index)} ({type(exc).__name__}: {exc})"
        if self.transform is not None:
            img = self.transform(img)
        return img, label


@dataclass(frozen=True)
class EncodedImage:
    """A sample as stored: the image file's bytes (never re-encoded), its extension, its label,
    and where it came from (for messages). What the shard converter copies between formats."""

    data: bytes
    ext: str
    label: int
    name: str


def sniff_extension(data: bytes) -> str:
    """The image format of encoded bytes, as a file extension (for bytes stored without a name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


class EncodedDataset(_SeededDataset):
    """A dataset of encoded image files (a folder, tar shards, Arrow tables): PIL decodes them in
    the worker, so every format gives the same pixels for the same bytes."""

    def encoded(self, index: int) -> EncodedImage:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, int]:
        sample = self.encoded(index)
        with Image.open(io.BytesIO(sample.data)) as img:
            img.load()
            return img, sample.label


class ImageFolderIndex:
    """The file list of one split, as numpy arrays (no per-worker copies of Python tuples).

    Listing 1.28M files takes minutes on network filesystems, so the list is cached
    (:mod:`~shufflemamba.data.index_cache`) keyed by the split's absolute path; rank 0 builds it,
    the others read it.
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
        cache = cache_file(cache_dir, "folder", root)
        cached = None if refresh else load_arrays(cache)
        if cached is not None:
            return cls(root, [str(c) for c in cached["classes"]], cached["paths"], cached["labels"])
        index = cls.scan(root)
        if write:
            save_arrays(cache, classes=np.array(index.classes), paths=index.rel_paths, labels=index.labels)
        return index


class FolderDataset(EncodedDataset):
    def __init__(self, index: ImageFolderIndex, transform: Any = None) -> None:
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def name_of(self, index: int) -> str:
        return str(self.index.root / self.index.rel_paths[index].decode())

    def encoded(self, index: int) -> EncodedImage:
        name = self.name_of(index)
        with open(name, "rb") as f:
            data = f.read()
        ext = name.rpartition(".")[2].lower()
        return EncodedImage(data, "jpg" if ext == "jpeg" else ext, int(self.index.labels[index]), name)


class TarDataset(EncodedDataset):
    """Samples stored in tar files, read at random through a :class:`TarIndex`: one ``pread`` of
    the member's bytes per sample on a file descriptor the worker keeps open (an LRU of at most
    ``max_open`` shards per worker; never a tar walk per sample)."""

    def __init__(self, index: TarIndex, transform: Any = None, max_open: int = 1) -> None:
        self.index, self.transform, self.max_open = index, transform, max(1, int(max_open))
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self.index.label

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # descriptors are per process
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def name_of(self, index: int) -> str:
        return self.index.where(index)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to manage
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = os.open(self.index.root / self.index.shards[shard], os.O_RDONLY)
        return fd

    def encoded(self, index: int) -> EncodedImage:
        ix = self.index
        size = int(ix.size[index])
        data = os.pread(self._fd(int(ix.shard[index])), size, int(ix.offset[index]))
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard is shorter than when it was indexed")
        name = ix.name[index].decode()
        ext = name.rpartition(".")[2].lower()
        return EncodedImage(data, "jpg" if ext == "jpeg" else ext, int(ix.label[index]), ix.where(index))


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


DATA_KINDS = ("imagenet", "wds", "hf", "imagenet_tar", "demo", "fake")


def _data_root(data_cfg: Any) -> Path:
    if OmegaConf.is_missing(data_cfg, "root") or data_cfg.root in (None, ""):
        raise UserError(f"data.root is not set: pass data.root=/path/to/the/data (data={data_cfg.kind})")
    root = Path(data_cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root}")
    return root


def _check_labels(labels: np.ndarray, num_classes: int, where: Any) -> None:
    """Every label is a class of the model's head: else one line naming the first sample outside."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise UserError(
            f"{where(int(bad[0]))} has label {int(labels[bad[0]])}, outside data.num_classes={num_classes} "
            f"({len(bad)} such samples)"
        )


def _tar_split(data_cfg: Any, root: Path, split: str, is_main: bool) -> TarDataset:
    cache_dir = default_cache_dir(data_cfg.get("index_cache_dir"))
    refresh, workers = bool(data_cfg.refresh_index), T.index_workers(data_cfg.index_workers)
    name = data_cfg.train_split if split == "train" else data_cfg.val_split
    if data_cfg.kind == "wds":
        pattern = data_cfg.train_shards if split == "train" else data_cfg.val_shards
        allow = bool(data_cfg.allow_count_mismatch)
        index = T.wds_index(root, name, pattern, cache_dir, workers, refresh, is_main, allow)
        return TarDataset(index, max_open=data_cfg.max_open_shards)
    if split == "train":
        return TarDataset(T.class_tar_index(root, data_cfg.train_tar, cache_dir, workers, refresh, is_main))
    labels_path = root / data_cfg.val_labels
    labels = T.read_val_labels(labels_path, T.class_names(root / data_cfg.train_tar))
    stamp = f"{labels_path}:{labels_path.stat().st_mtime_ns}"
    return TarDataset(T.flat_tar_index(root, data_cfg.val_tar, labels, cache_dir, refresh, is_main, stamp))


def open_split(data_cfg: Any, split: str, is_main: bool = True) -> EncodedDataset:
    """The stored samples of the ``split`` ("train" or "val") of a file-backed ``data.kind``, as
    they are (no transform, labels unchecked): what training reads and the shard converter copies.

    ``is_main``: this process writes the cached index (rank 0; the others wait for it and read it).
    """
    kind = data_cfg.kind
    if kind not in DATA_KINDS:
        raise UserError(f"unknown data.kind {kind!r}: use one of {', '.join(DATA_KINDS)}")
    if kind in ("demo", "fake"):
        raise UserError(f"data.kind={kind} is generated, not stored: it has no files to read")
    root = _data_root(data_cfg)
    if kind == "imagenet":
        folder = root / (data_cfg.train_split if split == "train" else data_cfg.val_split)
        cache_dir = default_cache_dir(data_cfg.get("index_cache_dir"))
        refresh = bool(data_cfg.get("refresh_index", False))
        return FolderDataset(ImageFolderIndex.load_or_scan(folder, cache_dir, refresh=refresh, write=is_main))
    if kind == "hf":
        from .hf import open_hf_split  # optional dependency: imported only when asked for

        return open_hf_split(data_cfg, root, split)
    return _tar_split(data_cfg, root, split, is_main)


def build_dataset(data_cfg: Any, split: str, transform: Any, is_main: bool = True) -> _SeededDataset:
    """The ``split`` ("train" or "val") of the dataset named by ``data.kind``, its labels checked
    against ``data.num_classes``, each sample passed through ``transform``."""
    kind = data_cfg.kind
    if kind == "demo":
        return DigitsDataset(split, data_cfg.img_size, data_cfg.get("val_fraction", 0.2), transform)
    if kind == "fake":
        size = data_cfg.num_train if split == "train" else data_cfg.num_val
        offset = 0 if split == "train" else 10**9
        return FakeDataset(size, data_cfg.img_size, data_cfg.num_classes, transform, offset=offset)
    dataset = open_split(data_cfg, split, is_main)
    if isinstance(dataset, FolderDataset):
        if dataset.num_classes != data_cfg.num_classes:
            raise UserError(
                f"{dataset.index.root} has {dataset.num_classes} class folders but "
                f"data.num_classes={data_cfg.num_classes}"
            )
    else:
        _check_labels(dataset.labels, data_cfg.num_classes, dataset.name_of)
    dataset.transform = transform
    return dataset
