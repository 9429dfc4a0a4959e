"""Random access into tar files: where each sample's bytes lie, found once, cached, checked.

timm and webdataset read shards as streams, which loses what the recipe needs (repeated
augmentation, an exact epoch on any number of workers, mid-epoch resume). A tar is not
compressed, so a member's bytes are one contiguous range of the file: one pass over the headers
gives (shard, data offset, size, label) per sample, and from then on a sample is one ``pread``
(timm's ``ReaderImageInTar`` and ``wids`` do the same). Three layouts are indexed:

- **webdataset shards** (``timm/imagenet-1k-wds``: ``<key>.jpg|png|webp`` + ``<key>.cls``, maybe
  ``<key>.json``; ``_info.json`` with ``splits.<name>.{num_samples, filenames, shard_lengths}``);
- **a tar of per-class tars** (``ILSVRC2012_img_train.tar``): the label is the class tar's rank;
- **a flat tar of images** with labels from a file (``ILSVRC2012_img_val.tar``).

The index is built in parallel over shards (or class tars), cached with each shard's size and
mtime, and rebuilt when a shard changed. Bad shards stop the run at index time with one line
naming the shard and the member: truncated, not a tar, compressed, a member without its label,
a count that disagrees with ``_info.json``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .index_cache import cache_file, load_arrays, save_arrays

log = logging.getLogger(__name__)

TAR_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff"})
INFO_FILE = "_info.json"
_BLOCK = tarfile.BLOCKSIZE


class ShardError(UserError):
    """A shard (or a member of one) that cannot be used as it is: one line naming both."""


@dataclass(frozen=True)
class ScanTask:
    """One tar to walk: a shard, or a class tar inside ``ILSVRC2012_img_train.tar``.

    ``base`` / ``length`` place an inner tar inside its file; ``layout`` says how members become
    samples: ``wds`` (grouped by key, label from ``<key>.cls``), ``class`` (every image is
    ``label``), ``flat`` (every image, labelled by its file name through ``labels``).
    """

    shard: int
    path: str
    where: str  # how messages name this tar
    layout: str
    base: int = 0
    length: int | None = None
    label: int = -1
    labels: dict[str, int] | None = None


@dataclass
class ScannedTar:
    offsets: np.ndarray  # absolute byte offset of each sample's image data in the shard file
    sizes: np.ndarray
    labels: np.ndarray
    names: list[str]  # the image member's name, for messages


class _Window(io.RawIOBase):
    """A read-only view of ``[base, base + length)`` of a file: a tar stored inside a tar."""

    def __init__(self, f: io.BufferedReader, base: int, length: int) -> None:
        self.f, self.base, self.length, self.pos = f, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.length + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.base + self.pos)
        data = self.f.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _walk(f: io.BufferedReader, task: ScanTask) -> list[tarfile.TarInfo]:
    """The regular-file members of one tar, checked to be whole.

    ``tarfile`` ends its walk silently at a truncated or garbled header past the first member, so
    the walk must end on the end-of-archive block and every member's data must lie in the file.
    """
    whole = task.base == 0 and task.length is None
    length = os.fstat(f.fileno()).st_size if task.length is None else task.length
    src = f if whole else io.BufferedReader(_Window(f, task.base, length), buffer_size=_BLOCK * 16)
    src.seek(0)
    if src.read(2) == b"\x1f\x8b":
        raise ShardError(f"{task.where}: compressed (gzip); shards must be plain .tar files to be read at random")
    src.seek(0)
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=src, mode="r:") as tar:  # closes nothing of ours (fileobj is external)
            for m in tar:
                if m.isfile():
                    members.append(m)
            end_offset = tar.offset
    except tarfile.TarError as exc:
        if not members:
            raise ShardError(f"{task.where}: not a readable tar file ({exc})") from None
        end_offset = -1  # a walk that broke off past the first member: a truncated or damaged file
    whole = [m.name for m in members if m.offset_data + m.size <= length]
    if end_offset >= 0:
        src.seek(end_offset)
    end = src.read(_BLOCK) if end_offset >= 0 else b""
    if len(end) < _BLOCK or end.strip(b"\0") or len(whole) < len(members):
        raise ShardError(
            f"{task.where}: truncated or corrupt after member {whole[-1] if whole else '(none)'} (the walk found no "
            f"end-of-archive block); re-copy or re-create this shard"
        )
    return members


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _wds_samples(f: io.BufferedReader, task: ScanTask, members: list[tarfile.TarInfo]) -> ScannedTar:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    previous = None
    for m in members:
        key, ext = _split_key(m.name)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {}
        elif key != previous:
            raise ShardError(f"{task.where}: key {key} appears twice, apart (members of a sample must be adjacent)")
        if ext in group:
            raise ShardError(f"{task.where}: member {m.name} appears twice")
        group[ext] = m
        previous = key
    offsets, sizes, labels, names = [], [], [], []
    for key, group in groups.items():
        images = [ext for ext in group if ext in TAR_IMAGE_EXTENSIONS]
        if len(images) != 1:
            what = "no image member" if not images else f"{len(images)} image members ({', '.join(images)})"
            raise ShardError(f"{task.where}: sample {key} has {what}; expected one of <key>.jpg|png|webp")
        if "cls" not in group:
            raise ShardError(f"{task.where}: member {group[images[0]].name} has no label ({key}.cls is missing)")
        cls = group["cls"]
        f.seek(task.base + cls.offset_data)
        text = f.read(cls.size)
        try:
            label = int(text.strip())
        except ValueError:
            raise ShardError(f"{task.where}: {cls.name} holds {text[:40]!r}, not a class index") from None
        image = group[images[0]]
        offsets.append(task.base + image.offset_data)
        sizes.append(image.size)
        labels.append(label)
        names.append(image.name)
    return ScannedTar(np.array(offsets, np.int64), np.array(sizes, np.int64), np.array(labels, np.int32), names)


def _image_samples(task: ScanTask, members: list[tarfile.TarInfo]) -> ScannedTar:
    offsets, sizes, labels, names = [], [], [], []
    for m in members:
        if _split_key(m.name)[1].rpartition(".")[2] not in TAR_IMAGE_EXTENSIONS:
            continue
        if task.layout == "class":
            label = task.label
        else:
            label = task.labels.get(m.name.rpartition("/")[2], -1) if task.labels else -1
            if label < 0:
                raise ShardError(f"{task.where}: member {m.name} has no label in the validation label file")
        offsets.append(task.base + m.offset_data)
        sizes.append(m.size)
        labels.append(label)
        names.append(m.name)
    if not names:
        raise ShardError(f"{task.where}: no image members")
    return ScannedTar(np.array(offsets, np.int64), np.array(sizes, np.int64), np.array(labels, np.int32), names)


def scan_tar(task: ScanTask) -> ScannedTar:
    """One tar's samples (runs in an index-building worker process)."""
    try:
        with open(task.path, "rb") as f:
            members = _walk(f, task)
            if task.layout == "wds":
                return _wds_samples(f, task, members)
            return _image_samples(task, members)
    except OSError as exc:
        raise ShardError(f"{task.where}: cannot be read ({exc.strerror or exc})") from None


def scan_all(tasks: Sequence[ScanTask], workers: int, desc: str) -> list[ScannedTar]:
    """Every task's samples, in task order, over ``workers`` processes."""
    workers = max(1, min(workers, len(tasks)))
    bar = tqdm(total=len(tasks), desc=desc, unit="tar", disable=not sys.stderr.isatty(), leave=False)
    results: list[ScannedTar] = []
    try:
        if workers == 1:
            for task in tasks:
                results.append(scan_tar(task))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(scan_tar, tasks, chunksize=max(1, len(tasks) // (workers * 8))):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


def index_workers(configured: int | None) -> int:
    """Processes that build an index: the configured number, else every core (at most 32)."""
    if configured:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, cores)


@dataclass
class TarIndex:
    """One split's samples as arrays: ``shard[i]`` (into ``shards``, relative to ``root``),
    ``offset[i]`` / ``size[i]`` (the image bytes in that file), ``label[i]``, ``name[i]``."""

    root: Path
    shards: list[str]
    fingerprints: np.ndarray  # (shards, 2): size and mtime_ns when indexed
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    name: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def where(self, i: int) -> str:
        """``shard.tar:member`` of sample ``i``."""
        return f"{self.shards[int(self.shard[i])]}:{self.name[i].decode()}"

    def shard_lengths(self) -> np.ndarray:
        return np.bincount(self.shard, minlength=len(self.shards))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "shards": np.array(self.shards, dtype=np.str_),
            "fingerprints": self.fingerprints,
            "shard": self.shard,
            "offset": self.offset,
            "size": self.size,
            "label": self.label,
            "name": self.name,
        }

    @classmethod
    def from_arrays(cls, root: Path, a: dict[str, np.ndarray]) -> TarIndex:
        return cls(root, [str(s) for s in a["shards"]], a["fingerprints"], a["shard"], a["offset"], a["size"],
                   a["label"], a["name"])  # fmt: skip

    @classmethod
    def from_scans(cls, root: Path, shards: list[str], fingerprints: np.ndarray, scans: list[tuple[int, ScannedTar]]):
        """Concatenate scans (each tagged with the index of the shard file it lies in)."""
        return cls(
            root,
            shards,
            fingerprints,
            np.concatenate([np.full(len(s.sizes), shard, np.int32) for shard, s in scans]),
            np.concatenate([s.offsets for _, s in scans]),
            np.concatenate([s.sizes for _, s in scans]),
            np.concatenate([s.labels for _, s in scans]),
            np.array([n for _, s in scans for n in s.names], dtype=np.bytes_),
        )


def fingerprints(root: Path, shards: Sequence[str]) -> np.ndarray:
    """Size and mtime of every shard; a missing shard is a one-line error naming it."""
    out = np.zeros((len(shards), 2), np.int64)
    for i, name in enumerate(shards):
        try:
            st = (root / name).stat()
        except FileNotFoundError:
            raise ShardError(f"shard not found: {root / name}") from None
        out[i] = (st.st_size, st.st_mtime_ns)
    return out


def load_or_build(
    kind: str,
    root: Path,
    shards: list[str],
    build: Callable[[np.ndarray], TarIndex],
    cache_dir: Path,
    refresh: bool = False,
    write: bool = True,
    extra_key: str = "",
) -> TarIndex:
    """The cached index of these shards, rebuilt when missing, asked for, or stale: a shard whose
    size or mtime differs from when it was indexed could have moved every offset."""
    current = fingerprints(root, shards)
    path = cache_file(cache_dir, kind, root, extra_key, *shards)
    cached = None if refresh else load_arrays(path)
    if cached is not None:
        if np.array_equal(cached["fingerprints"], current):
            return TarIndex.from_arrays(root, cached)
        changed = int(np.flatnonzero((cached["fingerprints"] != current).any(axis=1))[0])
        log.warning("%s changed since it was indexed (size / mtime): rebuilding the index", root / shards[changed])
    index = build(current)
    if write:
        save_arrays(path, **index.arrays())
    return index


# ---- webdataset shards ---------------------------------------------------------------------


def read_info(root: Path) -> dict | None:
    """``_info.json`` (timm's layout), or None when the folder has none."""
    path = root / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None


def wds_split_files(root: Path, split: str, pattern: str) -> tuple[list[str], dict | None]:
    """The split's shards (relative to root) and its ``_info.json`` entry: the file list of
    ``_info.json`` when there is one, else the tars matching ``pattern``."""
    info = read_info(root)
    if info is not None:
        splits = info.get("splits", {})
        if split not in splits:
            raise UserError(f"{root / INFO_FILE} has no split {split!r} (it has: {', '.join(splits) or 'none'})")
        entry = splits[split]
        names = entry.get("filenames")
        if not names:
            raise UserError(f"{root / INFO_FILE}: split {split!r} lists no filenames")
        return list(names), entry
    names = sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
    if not names:
        raise UserError(f"no shards match {root}/{pattern} (and there is no {INFO_FILE} naming them)")
    return names, None


def check_counts(index: TarIndex, entry: dict | None, split: str, allow_mismatch: bool) -> None:
    """The shards hold what ``_info.json`` says they hold, shard by shard; else one line (a count
    that disagrees is an error unless ``allow_mismatch``, then a warning)."""
    if entry is None:
        return
    problems = []
    lengths = entry.get("shard_lengths")
    actual = index.shard_lengths()
    if lengths is not None:
        for name, expected, found in zip(index.shards, lengths, actual, strict=False):
            if int(expected) != int(found):
                problems.append(f"{name} holds {found} samples, {INFO_FILE} says {expected}")
    if entry.get("num_samples") is not None and int(entry["num_samples"]) != len(index):
        problems.append(f"split {split!r} holds {len(index)} samples, {INFO_FILE} says {entry['num_samples']}")
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    message = f"{index.root}: {problems[0]}{more}"
    if not allow_mismatch:
        raise ShardError(f"{message}; set data.allow_count_mismatch=true to train on what is there")
    log.warning("%s; training on what is there (data.allow_count_mismatch)", message)


def wds_index(
    root: Path, split: str, pattern: str, cache_dir: Path, workers: int, refresh: bool, write: bool, allow: bool
) -> TarIndex:
    """The index of one split of a folder of webdataset shards, checked against ``_info.json``."""
    shards, entry = wds_split_files(root, split, pattern)

    def build(prints: np.ndarray) -> TarIndex:
        tasks = [ScanTask(i, str(root / s), s, "wds") for i, s in enumerate(shards)]
        scans = scan_all(tasks, workers, f"indexing {split} shards")
        return TarIndex.from_scans(root, shards, prints, list(enumerate(scans)))

    index = load_or_build("wds", root, shards, build, cache_dir, refresh, write)
    check_counts(index, entry, split, allow)
    return index


# ---- ILSVRC2012 tars -----------------------------------------------------------------------


def class_names(path: Path) -> list[str]:
    """The wnids of a tar of class tars, sorted: label ``i`` is ``class_names(...)[i]``."""
    with open(path, "rb") as f:
        outer = _walk(f, ScanTask(0, str(path), path.name, "outer"))
    names = sorted(m.name[: -len(".tar")] for m in outer if m.name.endswith(".tar"))
    if not names:
        raise ShardError(f"{path.name}: holds no class tars (<wnid>.tar); is it the training tar?")
    return names


def class_tar_index(root: Path, tar_name: str, cache_dir: Path, workers: int, refresh: bool, write: bool) -> TarIndex:
    """``ILSVRC2012_img_train.tar``: a tar of ``<wnid>.tar`` class tars, read in place; labels are
    the class tars' ranks in sorted order (the ImageFolder convention)."""

    def build(prints: np.ndarray) -> TarIndex:
        path = root / tar_name
        with open(path, "rb") as f:
            outer = _walk(f, ScanTask(0, str(path), tar_name, "outer"))
        inner = sorted((m for m in outer if m.name.endswith(".tar")), key=lambda m: m.name)
        if not inner:
            raise ShardError(f"{tar_name}: holds no class tars (<wnid>.tar); is it the training tar?")
        tasks = [
            ScanTask(0, str(path), f"{tar_name}:{m.name}", "class", base=m.offset_data, length=m.size, label=label)
            for label, m in enumerate(inner)
        ]
        scans = scan_all(tasks, workers, f"indexing {tar_name}")
        index = TarIndex.from_scans(root, [tar_name], prints, [(0, s) for s in scans])
        prefixes = np.repeat([m.name.encode() + b":" for m in inner], [len(s.sizes) for s in scans])
        index.name = np.char.add(prefixes.astype(np.bytes_), index.name)
        return index

    return load_or_build("class-tar", root, [tar_name], build, cache_dir, refresh, write)


def read_val_labels(path: Path, classes: list[str]) -> dict[str, int]:
    """File name -> label from a validation label file: Kaggle's ``LOC_val_solution.csv``
    (``ImageId,PredictionString`` whose first word is the wnid) or ``<file name> <wnid>`` lines."""
    if not path.is_file():
        raise UserError(f"validation label file not found: {path}")
    rank = {wnid: i for i, wnid in enumerate(classes)}
    labels: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or (lineno == 1 and fields[0] == "ImageId"):
            continue
        if len(fields) < 2 or fields[1] not in rank:
            raise UserError(f"{path}:{lineno}: expected '<image> <wnid>' with a known wnid, got {line[:80]!r}")
        name = fields[0] if "." in fields[0] else f"{fields[0]}.JPEG"
        labels[name] = rank[fields[1]]
    return labels


def flat_tar_index(
    root: Path, tar_name: str, labels: dict[str, int], cache_dir: Path, refresh: bool, write: bool, label_key: str
) -> TarIndex:
    """A flat tar of images (``ILSVRC2012_img_val.tar``), labelled by file name."""

    def build(prints: np.ndarray) -> TarIndex:
        scan = scan_tar(ScanTask(0, str(root / tar_name), tar_name, "flat", labels=labels))
        return TarIndex.from_scans(root, [tar_name], prints, [(0, scan)])

    return load_or_build("flat-tar", root, [tar_name], build, cache_dir, refresh, write, extra_key=label_key)
