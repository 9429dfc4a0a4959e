"""Images/s of the DeiT-recipe training data loader alone (decode, RandomResizedCrop 224, flip,
RandAugment, uint8 collate, repeated-augmentation sampler), exactly as train.py builds it, to
compare with the GPU's training step rate: a loader slower than the step starves the GPU.

    python scripts/benchmark.py loader --workers 16                 # synthetic JPEGs in a temp dir
    python scripts/benchmark.py loader --root /data/imagenet --workers 16 --batches 200

Without ``--root`` it writes ``--num-images`` synthetic JPEGs at ImageNet-like sizes (sides 300-500
px, quality 95, smooth content so file sizes are near ImageNet's ~110 KB average, not the
~3x larger noise images) in an ImageFolder tree. Reports images/s over ``--batches`` batches
after the first (worker start-up excluded), and per worker.
"""

from __future__ import annotations

import argparse
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
from shufflemamba.data.datasets import build_dataset
from shufflemamba.data.loader import build_train_loader, release_workers
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
    p.add_argument("--json", type=Path, default=None)


def run(args: argparse.Namespace) -> None:

    with tempfile.TemporaryDirectory() as tmp:
        root, mean_kb = args.root, None
        if root is None:
            root = Path(tmp)
            start = time.perf_counter()
            mean_kb = write_synthetic_imagenet(root, args.num_images, args.num_classes)
            print(f"wrote {args.num_images} JPEGs (mean {mean_kb:.0f} KB) in {time.perf_counter() - start:.0f} s")
        num_classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
        register_resolvers()
        overrides = [
            "data=imagenet",
            f"aug={args.aug}",
            f"data.root={root}",
            f"data.num_classes={num_classes}",
            f"data.batch_size={args.batch}",
            f"data.num_workers={args.workers}",
            f"data.index_cache_dir={tmp}/index",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        install_posterize_fix()
        dataset = build_dataset(cfg.data, "train", build_train_transform(cfg.data, cfg.aug))
        loader, sampler = build_train_loader(dataset, cfg.data, cfg.aug, rank=0, world=1, accum_steps=1, seed=0)
        seen, timed, start, first_s, epoch = 0, 0, None, None, 0
        t0 = time.perf_counter()
        while timed < args.batches:  # as many epochs as it takes (persistent workers keep running)
            sampler.set_epoch(epoch)
            for images, _, _ in loader:
                if start is None:
                    first_s = time.perf_counter() - t0
                    start = time.perf_counter()
                    shape = tuple(images.shape)
                    continue
                seen, timed = seen + images.shape[0], timed + 1
                if timed >= args.batches:
                    break
            epoch += 1
        seconds = time.perf_counter() - start
        release_workers(loader)  # stop the workers before their files are removed
    result = {
        "images_per_s": seen / seconds,
        "per_worker": seen / seconds / max(args.workers, 1),
        "workers": args.workers,
        "batch": args.batch,
        "batches_timed": timed,
        "epochs": epoch,
        "first_batch_s": first_s,
        "batch_shape": shape,
        "mean_jpeg_kb": mean_kb,
        "aug": args.aug,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
