"""Images/s of the DeiT-recipe training data loader alone (decode, RandomResizedCrop 224, flip,
RandAugment, uint8 collate, repeated-augmentation sampler), exactly as train.py builds it, to
compare with the GPU's training step rate: a loader slower than the step starves the GPU. The
same images are read as an ImageFolder, as tar shards (``data=wds``, written by our converter)
and as parquet (``data=hf``), timed in turn (``--rounds``), per worker and in total; and, with
``--index-shards``, the time to index that many shards and to load the cached index.

    python scripts/benchmark.py loader --workers 16                 # synthetic JPEGs in a temp dir
    python scripts/benchmark.py loader --root /data/imagenet --workers 16 --batches 200 --formats imagenet
    python scripts/benchmark.py loader --workers 2 --index-shards 1024   # + the index of 1,024 shards

Without ``--root`` it writes ``--num-images`` synthetic JPEGs at ImageNet-like sizes (sides 300-500
px, quality 95, smooth content so file sizes are near ImageNet's ~110 KB average, not the
~3x larger noise images) in an ImageFolder tree. Reports images/s over ``--batches`` batches
after the first (worker start-up excluded), and per worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from shufflemamba.config import register_resolvers
from shufflemamba.data.datasets import build_dataset, open_split
from shufflemamba.data.loader import build_train_loader, release_workers
from shufflemamba.data.shard_writer import convert, plan_split
from shufflemamba.data.transforms import build_train_transform, install_posterize_fix

ROOT = Path(__file__).resolve().parents[2]


def _write_jpegs(root: Path, indices: range, num_classes: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, indices.start])
    sizes = []
    for i in indices:
        width, height = (int(v) for v in rng.integers(300, 501, size=2))
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.integers(-16, 17, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
        folder = root / "train" / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:07d}.JPEG"
        img.save(path, quality=95)
        sizes.append(path.stat().st_size)
    return sizes


def write_synthetic_imagenet(root: Path, num_images: int, num_classes: int, seed: int = 0) -> float:
    """ImageFolder tree of smooth random JPEGs under root/train (all cores); returns the mean size in KB."""
    chunk = 250
    jobs = [range(s, min(s + chunk, num_images)) for s in range(0, num_images, chunk)]
    with ProcessPoolExecutor() as pool:
        sizes = [
            s
            for part in pool.map(_write_jpegs, [root] * len(jobs), jobs, [num_classes] * len(jobs), [seed] * len(jobs))
            for s in part
        ]
    return float(np.mean(sizes)) / 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=None, help="ImageNet root (train/<class>/*); default: synthetic")
    p.add_argument("--num-images", type=int, default=4000)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="timed batches (after the first)")
    p.add_argument("--aug", default="deit")
    p.add_argument("--formats", default="imagenet,wds,hf",
                   help="the same images as an ImageFolder, converted to tar shards and to parquet")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="formats timed in turn, this many times each")
    p.add_argument("--index-shards", type=int, default=0,
                   help="also time building the index of this many synthetic shards (timm's layout: 1024)")  # fmt: skip
    p.add_argument("--index-members", type=int, default=1250, help="samples per synthetic shard")
    p.add_argument("--index-workers", type=int, default=None, help="default: every core, at most 32")
    p.add_argument("--json", type=Path, default=None)


def _compose(kind: str, root: Path, tmp: Path, num_classes: int, args: argparse.Namespace):
    overrides = [
        f"data={kind}",
        f"aug={args.aug}",
        f"data.root={root}",
        f"data.num_classes={num_classes}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.index_cache_dir={tmp}/index",
    ]
    if kind == "hf":
        overrides.append(f"data.hf_cache_dir={tmp}/hf")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _prepare_formats(folder: Path, tmp: Path, formats: list[str], workers: int) -> dict[str, Path]:
    """The ImageFolder's train split as shards (our converter) and as parquet files."""
    roots = {"imagenet": folder}
    cfg = _compose("imagenet", folder, tmp, len(list((folder / "train").iterdir())), argparse.Namespace(
        aug="deit", batch=1, workers=0))  # fmt: skip
    source = open_split(cfg.data, "train")
    if "wds" in formats:
        start = time.perf_counter()
        plan = plan_split("train", str(folder), len(source), "bench", 1250, None)
        convert({"train": source}, [plan], tmp / "wds", workers=workers)
        roots["wds"] = tmp / "wds"
        print(f"converted to {len(plan.filenames)} shards in {time.perf_counter() - start:.1f} s")
    if "hf" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp / "hf" / "data").mkdir(parents=True)
        samples = [source.encoded(i) for i in range(len(source))]
        table = pa.table({
            "image": [{"bytes": s.data, "path": s.name.rsplit("/", 1)[-1]} for s in samples],
            "label": [s.label for s in samples],
        })  # fmt: skip
        pq.write_table(table, tmp / "hf" / "data" / "train-00000-of-00001.parquet", row_group_size=1000)
        roots["hf"] = tmp / "hf"
    return roots


def _time_loader(cfg, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    dataset = build_dataset(cfg.data, "train", build_train_transform(cfg.data, cfg.aug))
    open_s = time.perf_counter() - start
    loader, sampler = build_train_loader(dataset, cfg.data, cfg.aug, rank=0, world=1, accum_steps=1, seed=0)
    seen, timed, begin, first_s, epoch, shape = 0, 0, None, None, 0, None
    t0 = time.perf_counter()
    while timed < args.batches:  # as many epochs as it takes (persistent workers keep running)
        sampler.set_epoch(epoch)
        for images, _, _ in loader:
            if begin is None:
                first_s, begin, shape = time.perf_counter() - t0, time.perf_counter(), tuple(images.shape)
                continue
            seen, timed = seen + images.shape[0], timed + 1
            if timed >= args.batches:
                break
        epoch += 1
    seconds = time.perf_counter() - begin
    release_workers(loader)  # stop the workers before their files are removed
    return {
        "images_per_s": seen / seconds,
        "per_worker": seen / seconds / max(args.workers, 1),
        "batches_timed": timed,
        "epochs": epoch,
        "first_batch_s": first_s,
        "open_s": open_s,
        "batch_shape": shape,
    }


def _write_index_shards(job: tuple[Path, int, int, int]) -> None:
    """One webdataset shard of ``members`` samples with small payloads: the index reads headers
    only, so its cost is in the member count, not the image bytes."""
    import io
    import tarfile

    folder, shard, members, payload = job
    with tarfile.open(folder / f"bench-train-{shard:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(members):
            key = f"{shard:04d}{i:06d}"
            for ext, data in (("jpg", b"\xff\xd8" + bytes(payload)), ("cls", str(i % 1000).encode()),
                              ("json", b'{"label": 0}')):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def time_index_build(tmp: Path, shards: int, members: int, workers: int | None) -> dict:
    """Index build for ``shards`` shards of ``members`` samples (jpg + cls + json each), then the
    load of the cached index, as a run's start-up does."""
    from shufflemamba.data.tar_index import index_workers, wds_index

    folder = tmp / "index_shards"
    folder.mkdir()
    jobs = [(folder, s, members, 512) for s in range(shards)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_index_shards, jobs, chunksize=8))
    workers = index_workers(workers)
    start = time.perf_counter()
    index = wds_index(folder, "train", "*-train-*.tar", tmp / "index_cache", workers, True, True, False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    again = wds_index(folder, "train", "*-train-*.tar", tmp / "index_cache", workers, False, False, False)
    load_s = time.perf_counter() - start
    assert len(again) == len(index) == shards * members
    return {"shards": shards, "samples": len(index), "index_workers": workers, "build_s": build_s,
            "cached_load_s": load_s}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    formats = [f for f in args.formats.split(",") if f]
    if "hf" in formats and importlib.util.find_spec("datasets") is None:
        print("hf: skipped (the datasets package is not installed: pip install -e '.[hf]')")
        formats.remove("hf")
    results: dict[str, list[dict]] = {f: [] for f in formats}
    index = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, mean_kb = args.root, None
        if root is None:
            root = tmp / "folder"
            start = time.perf_counter()
            mean_kb = write_synthetic_imagenet(root, args.num_images, args.num_classes)
            print(f"wrote {args.num_images} JPEGs (mean {mean_kb:.0f} KB) in {time.perf_counter() - start:.0f} s")
        num_classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
        register_resolvers()
        install_posterize_fix()
        roots = _prepare_formats(root, tmp, formats, args.workers or 1)
        for _ in range(args.rounds):  # interleaved: the machine's drift hits every format alike
            for kind in formats:
                results[kind].append(_time_loader(_compose(kind, roots[kind], tmp, num_classes, args), args))
                print(kind, json.dumps(results[kind][-1]))
        if args.index_shards:
            index = time_index_build(tmp, args.index_shards, args.index_members, args.index_workers)
            print("index", json.dumps(index))
    best = {kind: max(rows, key=lambda r: r["images_per_s"]) for kind, rows in results.items()}
    result = {
        **{k: v for k, v in best[formats[0]].items()},  # the first format's figures at the top level
        "formats": {
            kind: {**row, "vs_first": row["images_per_s"] / best[formats[0]]["images_per_s"]}
            for kind, row in best.items()
        },  # fmt: skip
        "index": index,
        "workers": args.workers,
        "batch": args.batch,
        "mean_jpeg_kb": mean_kb,
        "aug": args.aug,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
