"""Write a dataset as tar shards in timm's layout (``scripts/make_shards.py``).

Any file-backed format we read (an ImageFolder, shards, ILSVRC2012 tars, Hugging Face files)
becomes ``<prefix>-<split>-<NNNN>.tar`` shards of ``samples_per_shard`` samples, each
``<key>.<ext>`` (the original bytes, never re-encoded) + ``<key>.cls`` + ``<key>.json`` (the
source name and label), and ``_info.json`` with ``splits.<name>.{num_samples, filenames,
shard_lengths}`` — what ``data=wds`` (and timm's and webdataset's readers) expect.

Shards are written in parallel, each to a temporary name and renamed when whole, so a killed
conversion continues where it stopped: the same command skips the shards that exist. Shards
are deterministic (fixed member metadata), so a resumed conversion gives the bytes an
uninterrupted one gives. The plan (source, sizes, file names) is recorded in
``_make_shards.json`` until the end, and a rerun with another plan into the same folder is
refused rather than mixed.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .datasets import EncodedDataset
from .tar_index import INFO_FILE

PLAN_FILE = "_make_shards.json"


@dataclass(frozen=True)
class SplitPlan:
    """Which source samples go to which shard file of one output split."""

    name: str  # the output split ("train", "validation")
    prefix: str  # of the shard file names: <prefix>-<name>-NNNN.tar
    source: str  # where the samples come from (for the record and the plan check)
    order: list[int]  # source index of output sample i
    shuffle_seed: int | None
    samples_per_shard: int
    filenames: list[str]

    def shard_range(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, len(self.order)))


def plan_split(
    name: str, source: str, num_samples: int, prefix: str, samples_per_shard: int, shuffle_seed: int | None
) -> SplitPlan:
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be >= 1")
    order = np.arange(num_samples)
    if shuffle_seed is not None:  # streaming readers (timm, webdataset) want mixed classes per shard
        order = np.random.default_rng(shuffle_seed).permutation(num_samples)
    shards = -(-num_samples // samples_per_shard)
    width = max(2, len(str(shards - 1)))  # timm: -0000..1023 for train, -00..63 for validation
    filenames = [f"{prefix}-{name}-{i:0{width}d}.tar" for i in range(shards)]
    return SplitPlan(name, prefix, source, order.tolist(), shuffle_seed, samples_per_shard, filenames)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same bytes every time
    tar.addfile(info, io.BytesIO(data))


_SOURCE: EncodedDataset | None = None


def _set_source(dataset: EncodedDataset) -> None:
    global _SOURCE
    _SOURCE = dataset


def write_shard(path: Path, dataset: EncodedDataset, indices: Sequence[int], first_position: int) -> int:
    """Samples ``indices`` of ``dataset`` as one shard at ``path`` (written aside, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for position, index in enumerate(indices, first_position):
            sample = dataset.encoded(int(index))
            key = f"{position:08d}"  # no dots: webdataset splits the key at the first one
            _member(tar, f"{key}.{sample.ext}", sample.data)
            _member(tar, f"{key}.cls", str(sample.label).encode())
            record = {"filename": sample.name, "label": sample.label, "source_index": int(index)}
            _member(tar, f"{key}.json", json.dumps(record).encode())
    os.replace(tmp, path)
    return len(indices)


def _write_job(job: tuple[str, list[int], int]) -> int:
    path, indices, first = job
    assert _SOURCE is not None
    return write_shard(Path(path), _SOURCE, indices, first)


def _check_plan(dst: Path, plans: list[SplitPlan]) -> None:
    """Refuse to continue a conversion of something else into the same folder."""
    record = dst / PLAN_FILE
    wanted = [{k: v for k, v in asdict(p).items() if k != "order"} | {"num_samples": len(p.order)} for p in plans]
    if record.is_file():
        if json.loads(record.read_text()) != wanted:
            raise UserError(
                f"{dst} holds an unfinished conversion with other settings ({record}); use another folder, "
                f"or delete it to start over"
            )
        return
    existing = sorted(p.name for p in dst.glob("*.tar"))
    if existing:
        raise UserError(f"{dst} already holds shards ({existing[0]}, ...) not written by this conversion")
    record.write_text(json.dumps(wanted, indent=1) + "\n")


def convert(sources: dict[str, EncodedDataset], plans: list[SplitPlan], dst: Path, workers: int = 1) -> dict[str, dict]:
    """Write every plan's shards (``sources[plan.name]`` supplies the samples), then ``_info.json``."""
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / INFO_FILE).is_file() and not (dst / PLAN_FILE).is_file():
        raise UserError(f"{dst} already holds a finished set of shards ({INFO_FILE}); use another folder")
    _check_plan(dst, plans)
    for plan in plans:
        todo = [
            (str(dst / fname), [plan.order[i] for i in plan.shard_range(s)], plan.shard_range(s).start)
            for s, fname in enumerate(plan.filenames)
            if not (dst / fname).is_file()
        ]
        done = len(plan.order) - sum(len(j[1]) for j in todo)
        bar = tqdm(total=len(plan.order), initial=done, desc=f"{plan.name} shards", unit="img",
                   disable=not sys.stderr.isatty())  # fmt: skip
        source = sources[plan.name]
        if workers <= 1 or len(todo) <= 1:
            _set_source(source)
            for job in todo:
                bar.update(_write_job(job))
        else:
            with ProcessPoolExecutor(min(workers, len(todo)), initializer=_set_source, initargs=(source,)) as pool:
                for written in pool.map(_write_job, todo):
                    bar.update(written)
        bar.close()
    splits = {
        p.name: {
            "name": p.name,
            "num_samples": len(p.order),
            "filenames": p.filenames,
            "shard_lengths": [len(p.shard_range(s)) for s in range(len(p.filenames))],
            "source": p.source,
        }
        for p in plans
    }
    info = {"name": plans[0].prefix, "splits": splits}
    tmp = dst / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, dst / INFO_FILE)
    (dst / PLAN_FILE).unlink()
    return splits
