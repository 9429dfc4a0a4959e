"""ImageNet as Hugging Face ``datasets`` files on local disk, read at random (map-style).

Two layouts: a ``save_to_disk`` folder (``dataset_dict.json`` + one folder per split) is opened
in place; parquet files (the hub's ``ILSVRC/imagenet-1k``: ``data/train-*.parquet``, columns
``image`` = {bytes, path} and ``label``) are converted once by ``datasets`` into its Arrow cache
(``data.hf_cache_dir``), then opened from there. Either way the table is memory-mapped (no copy
per worker), the image column stays encoded and PIL decodes the bytes in the worker, exactly as
for the other formats. Our sampler orders the samples; ``split_dataset_by_node`` would give each
rank a contiguous, class-sorted block.

``datasets`` is an optional extra: ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .datasets import EncodedDataset, EncodedImage, sniff_extension

log = logging.getLogger(__name__)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data=hf needs Hugging Face's datasets package: pip install -e '.[hf]' (or pip install datasets)"
        ) from None
    return datasets


class HFImageDataset(EncodedDataset):
    """One split of a ``datasets.Dataset`` whose image column holds encoded bytes."""

    def __init__(self, table: Any, image_column: str, labels: np.ndarray, where: str, transform: Any = None) -> None:
        self.table, self.image_column, self.labels = table, image_column, labels
        self.where, self.transform = where, transform

    def __len__(self) -> int:
        return len(self.labels)

    def name_of(self, index: int) -> str:
        return f"{self.where}[{index}]"

    def encoded(self, index: int) -> EncodedImage:
        value = self.table[int(index)][self.image_column]
        path = None
        if isinstance(value, dict):
            value, path = value.get("bytes"), value.get("path")
        if not isinstance(value, bytes | bytearray):
            raise ValueError(f"column {self.image_column!r} holds {type(value).__name__}, not encoded image bytes")
        ext = path.rpartition(".")[2].lower() if path and "." in path else sniff_extension(value)
        name = f"{self.name_of(index)} ({path})" if path else self.name_of(index)
        return EncodedImage(bytes(value), "jpg" if ext == "jpeg" else ext, int(self.labels[index]), name)


def _parquet_files(root: Path, split: str, pattern: str | None) -> list[str]:
    if pattern:
        files = sorted(root.glob(pattern))
    else:  # the hub's layouts: data/<split>-00000-of-00042.parquet, or <split>/*.parquet
        files = sorted(root.glob(f"**/{split}-*.parquet")) or sorted(root.glob(f"**/{split}/*.parquet"))
    if not files:
        shown = pattern or f"**/{split}-*.parquet or **/{split}/*.parquet"
        raise UserError(
            f"no parquet files of split {split!r} under {root} (looked for {shown}); set data.train_files / "
            f"data.val_files, or point data.root at a save_to_disk folder"
        )
    return [str(f) for f in files]


def open_split(data_cfg: Any, root: Path, split_name: str, files_pattern: str | None) -> Any:
    """The split as a memory-mapped ``datasets.Dataset`` (parquet converted to Arrow once)."""
    datasets = _import_datasets()
    if (root / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(root))
        if split_name not in splits:
            raise UserError(f"{root} has no split {split_name!r} (it has: {', '.join(splits)})")
        return splits[split_name]
    if (root / split_name / "state.json").is_file():
        return datasets.load_from_disk(str(root / split_name))
    files = _parquet_files(root, split_name, files_pattern)
    return datasets.load_dataset(
        "parquet", data_files={split_name: files}, split=split_name, cache_dir=data_cfg.get("hf_cache_dir")
    )


def open_hf_split(data_cfg: Any, root: Path, split: str) -> HFImageDataset:
    """``data=hf``: the train or val split of the folder at ``data.root``."""
    datasets = _import_datasets()
    train = split == "train"
    split_name = data_cfg.train_split if train else data_cfg.val_split
    table = open_split(data_cfg, root, split_name, data_cfg.train_files if train else data_cfg.val_files)
    image_col, label_col = data_cfg.image_column, data_cfg.label_column
    missing = [c for c in (image_col, label_col) if c not in table.column_names]
    if missing:
        raise UserError(
            f"{root} split {split_name!r} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
            f"set data.image_column / data.label_column"
        )
    labels = np.asarray(table.with_format("numpy")[label_col]).astype(np.int64)
    if isinstance(table.features[image_col], datasets.Image):
        table = table.cast_column(image_col, datasets.Image(decode=False))  # keep the bytes: PIL decodes them
    table = table.select_columns([image_col])
    return HFImageDataset(table, image_col, labels, f"{root.name}:{split_name}")
