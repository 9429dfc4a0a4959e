"""Helpers to run train.py / eval.py as a user would: real subprocesses, tiny models."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    # The triton backend's kernels run on CPU tensors under Triton's interpreter; it must be on before
    # they are first imported (and it is inherited by the train.py / eval.py subprocesses).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from shufflemamba.config import register_resolvers  # noqa: E402
from shufflemamba.engine.builders import resolve_input_settings  # noqa: E402
from shufflemamba.ops import ScanArgs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A tiny ShuffleMamba on the embedded digits: seconds per run on 2 CPU cores.
TINY = [
    "experiment=demo",
    "model.embed_dim=32",
    "model.depth=2",
    "data.batch_size=32",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=5",
    "trainer.progress_bar=false",
]


def compose_cfg(name: str, overrides: list[str]):
    """The config train.py / eval.py would see for these command-line overrides."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("SHUFFLEMAMBA_SCAN_BACKEND", None)
    return env


def run_script(
    script: str,
    *overrides: str,
    torchrun: int | None = None,
    check: bool = True,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            script,
            *overrides,
        ]
    else:
        cmd = [sys.executable, script, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_run(overrides: list[str], run_dir: Path, nproc: int | None = None) -> subprocess.Popen:
    """train.py in its own process group (under torchrun with ``nproc`` ranks), output discarded:
    for tests that signal or kill a run."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [sys.executable, *launcher, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_checkpoints(proc: subprocess.Popen, run_dir: Path, count: int = 1, timeout: float = 180) -> int:
    """Wait until the run has (re)written last.pt ``count`` times, or ended; how many it wrote."""
    last = run_dir / "checkpoints" / "last.pt"
    stamp = last.stat().st_mtime_ns if last.exists() else 0
    seen, deadline = 0, time.time() + timeout
    while seen < count and time.time() < deadline and proc.poll() is None:
        if last.exists() and last.stat().st_mtime_ns != stamp:
            stamp, seen = last.stat().st_mtime_ns, seen + 1
        time.sleep(0.01)
    return seen


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state: its random inputs (an unseeded randn_like
    gradient, say) then never depend on which tests ran before it, or in what order."""
    torch.manual_seed(0)


def tiny_vim(name: str = "vim_tiny_patch16_224", **kw):
    """A 3-block, 32-wide Vim / ShuffleMamba at 32 px (patch 8), 7 classes."""
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_classes": 7, **kw}
    return timm.create_model(name, **kw)


def tiny_vmamba(**kw):
    """A 4-stage VMamba 8 wide, depths 1-2-1-1, 5 classes, no drop path."""
    kw = {"dims": 8, "depths": (1, 2, 1, 1), "num_classes": 5, "drop_path_rate": 0.0, **kw}
    return timm.create_model("vmamba_tiny", **kw)


def make_scan_inputs(b, d, L, N, groups=None, dtype=torch.float32, seed=0):
    """Random selective-scan inputs (u, delta, A, B, C, D, z, delta_bias) requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shape_bc = (b, N, L) if groups is None else (b, groups, N, L)

    def t(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, dtype=dtype) * scale + shift

    inputs = dict(
        u=t(b, d, L),
        delta=t(b, d, L, scale=0.5),
        A=-(torch.rand(d, N, generator=g, dtype=dtype) * 4 + 0.2),
        B=t(*shape_bc),
        C=t(*shape_bc),
        D=t(d),
        z=t(b, d, L),
        delta_bias=t(d, scale=0.5, shift=-1.0),
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def make_scan_args(
    b, L, K, E, N, *, shared_u=False, shared_z=False, directions=None, grid=None, combine="none", optional=True,
    softplus=True, dtype=torch.float32, seed=0,
) -> ScanArgs:  # fmt: skip
    """Random token-major ScanArgs (batch b, length L, K directions of E channels, state N), leaves
    requiring grad; ``optional`` adds D, z and the delta bias."""
    g = torch.Generator().manual_seed(seed)

    def t(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dtype).requires_grad_()

    return ScanArgs(
        u=t(b, L, 1 if shared_u else K, E),
        delta=t(b, L, K, E, scale=0.5),
        A=(-(torch.rand(K, E, N, generator=g) * 4 + 0.2)).requires_grad_(),
        B=t(b, L, K, N),
        C=t(b, L, K, N),
        D=t(K, E) if optional else None,
        z=t(b, L, 1 if shared_z else K, E) if optional else None,
        delta_bias=t(K, E, scale=0.5, shift=-1.0) if optional else None,
        delta_softplus=softplus,
        directions=directions,
        grid=grid,
        combine=combine,
    )


def scan_leaves(args: ScanArgs) -> dict[str, torch.Tensor]:
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    return {n: t for n, t in zip(names, args.tensors(), strict=True) if t is not None}


def write_image_folder(root: Path, per_split: dict[str, int], num_classes: int = 4, seed: int = 0) -> Path:
    """An ImageFolder of small random JPEGs (and one PNG per split) of varied sizes:
    ``root/<split>/c<k>/img_<i>.JPEG``, image ``i`` in class ``i % num_classes``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for i in range(count):
            folder = root / split / f"c{i % num_classes}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(18, 40, size=2))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(folder / (f"img_{i:04d}.png" if i == 5 else f"img_{i:04d}.JPEG"), quality=90)
    return root


def write_parquet(folder: Path, root: Path, split_dirs: dict[str, str]) -> Path:
    """The ImageFolder at ``folder`` as parquet files in the hub's ILSVRC/imagenet-1k layout
    (``root/data/<split>-0000i-of-0000n.parquet``, columns image = {bytes, path} and label), in
    the ImageFolder's sample order (sorted classes, sorted files), two files per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    for source, split in split_dirs.items():
        classes = sorted(p.name for p in (folder / source).iterdir())
        rows = [
            ({"bytes": f.read_bytes(), "path": f.name}, label)
            for label, c in enumerate(classes)
            for f in sorted((folder / source / c).iterdir())
        ]
        half = (len(rows) + 1) // 2
        for part, chunk in enumerate((rows[:half], rows[half:])):
            table = pa.table({"image": [r[0] for r in chunk], "label": [r[1] for r in chunk]})
            pq.write_table(table, root / "data" / f"{split}-{part:05d}-of-00002.parquet")
    return root


def data_cfg(kind: str, root: Path, cache: Path, *overrides: str, img_size: int = 16):
    """The composed ``data`` config of ``data=<kind>`` over ``root`` for the 4-class test images."""
    extra = ["data.index_workers=2"] if kind in ("wds", "imagenet_tar") else []
    if kind == "hf":
        extra = [f"data.hf_cache_dir={cache / 'hf'}"]
    cfg = compose_cfg(
        "train",
        [
            "model=vim_tiny_patch16_224",
            f"data={kind}",
            f"data.root={root}",
            "data.num_classes=4",
            f"data.img_size={img_size}",
            f"data.index_cache_dir={cache}",
            *extra,
            *overrides,
        ],
    )
    resolve_input_settings(cfg.data, _meta_model())  # what the model leaves to the data: crop, mean / std
    return cfg.data, cfg.aug


@functools.cache
def _meta_model():
    return timm.create_model("vim_tiny_patch16_224", device="meta")


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """The same few hundred small images as an ImageFolder, as tar shards (written by our
    converter, several per split) and as parquet files; one index cache for all."""
    from shufflemamba.data.datasets import open_split
    from shufflemamba.data.shard_writer import convert, plan_split

    base = tmp_path_factory.mktemp("image_sets")
    folder = write_image_folder(base / "folder", {"train": 192, "val": 48})
    cache = base / "cache"
    sources, plans = {}, []
    for split, name in (("train", "train"), ("val", "validation")):
        cfg, _ = data_cfg("imagenet", folder, cache)
        sources[name] = open_split(cfg, split)
        plans.append(plan_split(name, str(folder), len(sources[name]), "tiny", 40, None))
    convert(sources, plans, base / "wds", workers=2)
    write_parquet(folder, base / "parquet", {"train": "train", "val": "validation"})
    return {"imagenet": folder, "wds": base / "wds", "hf": base / "parquet", "cache": cache, "base": base}
