"""Training-step and inference throughput (images/s) and peak memory: our models on each scan
path (Vim / ShuffleMamba, VMamba) against timm's DeiT and MambaOut, at several resolutions, with
bf16 autocast, with/without torch.compile.

GPU (what the numbers in docs/benchmarks.md come from):
    python scripts/benchmark.py --out-dir bench/          # CSV + markdown table
CPU smoke test (tiny sizes, so CI can run it):
    python scripts/benchmark.py --device cpu --tiny --resolutions 64 --batch 2 --steps 2 --warmup 1

Variants: "<vim>/cuda-fused", "<vim>/cuda-unfused", "<vim>/torch" for the Vim family, "<vmamba>/cuda"
and "<vmamba>/torch" for VMamba (cuda ones skipped where the kernels are unavailable), the bare name
for timm's models. Family comparison on CPU:
    python scripts/benchmark.py --device cpu --no-amp --resolutions 224 --batch 8 --steps 3 --warmup 1 \
        --models vim_tiny_patch16_224,vmamba_tiny,mambaout_tiny,deit_tiny_patch16_224 A variant that runs out of memory
is recorded as OOM instead of stopping the run. ``--profile VARIANT`` prints a profiler table of one
training step of that variant at the first resolution.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import shufflemamba  # noqa: F401
from shufflemamba.ops import cuda_kernels_available, use_backend

OURS = ["vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224"]
DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
VMAMBA = ["vmamba_tiny", "vmamba_small", "vmamba_base"]
MAMBAOUT = ["mambaout_tiny", "mambaout_small", "mambaout_base"]
VIM_FAMILY = ("vim_", "shufflemamba_")
# 2-layer-ish versions of each family for --tiny smoke runs
TINY_KWARGS = {
    "vim_": dict(depth=2, embed_dim=32),
    "shufflemamba_": dict(depth=2, embed_dim=32),
    "deit": dict(depth=2, embed_dim=64, num_heads=2),
    "vmamba_": dict(dims=16, depths=(1, 1, 1, 1)),
    "mambaout_": dict(dims=(16, 24, 32, 48), depths=(1, 1, 1, 1)),
}


def variants(models: list[str], device: str) -> list[tuple[str, str, str | None, bool]]:
    """(label, timm name, scan backend or None, fused) for every measurable variant."""
    out = []
    kernels = device == "cuda" and cuda_kernels_available()
    for name in models:
        if name.startswith(VIM_FAMILY):
            if kernels:
                out += [(f"{name}/cuda-fused", name, "cuda", True), (f"{name}/cuda-unfused", name, "cuda", False)]
            out.append((f"{name}/torch", name, "torch", True))
        elif name.startswith("vmamba_"):
            if kernels:
                out.append((f"{name}/cuda", name, "cuda", True))
            out.append((f"{name}/torch", name, "torch", True))
        else:
            out.append((name, name, None, True))
    return out


def build(name: str, res: int, fused: bool, tiny: bool, device: str):
    kw = {}
    if name.startswith((*VIM_FAMILY, "deit")):  # fixed-grid models; the conv hierarchies take any size
        kw["img_size"] = res
    if name.startswith(VIM_FAMILY):
        kw["fused_directions"] = fused
    if tiny:
        kw.update(next(v for prefix, v in TINY_KWARGS.items() if name.startswith(prefix)))
    return timm.create_model(name, **kw).to(device)


def measure(model, batch, res, device, train, steps, warmup, amp, compile_model) -> dict:
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fn = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model.train(train)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)

    def step():
        if train:
            with autocast:
                loss = F.cross_entropy(fn(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), autocast:
                fn(x)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"img_s": batch / seconds, "ms_per_step": 1e3 * seconds, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(OURS + VMAMBA + DEIT + MAMBAOUT))
    p.add_argument("--resolutions", default="224,512,1024")
    p.add_argument(
        "--batch", type=int, default=64, help="images per step at 224 (scaled down by (224/res)^2 above 224)"
    )
    p.add_argument("--modes", default="train,inference")
    p.add_argument("--compile", default="off", help="off | on | both")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="2-layer models (smoke tests)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--profile", default=None, help="variant label to profile for one training step")
    args = p.parse_args()

    resolutions = [int(r) for r in args.resolutions.split(",")]
    compile_opts = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for label, name, backend, fused in variants(args.models.split(","), args.device):
        for res in resolutions:
            batch = max(1, round(args.batch * min(1.0, (224 / res) ** 2)))
            for mode in args.modes.split(","):
                for compiled in compile_opts:
                    row = {
                        "variant": label,
                        "resolution": res,
                        "batch": batch,
                        "mode": mode,
                        "compile": compiled,
                        "amp": "fp32" if args.no_amp else "bf16",
                    }
                    try:
                        with use_backend(backend or "auto"):
                            model = build(name, res, fused, args.tiny, args.device)
                            row.update(
                                measure(
                                    model,
                                    batch,
                                    res,
                                    args.device,
                                    mode == "train",
                                    args.steps,
                                    args.warmup,
                                    not args.no_amp,
                                    compiled,
                                )
                            )
                    except torch.OutOfMemoryError:
                        row.update(img_s=None, ms_per_step=None, peak_gib="OOM")
                    finally:
                        model = None
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    if args.profile:
        label, name, backend, fused = next(
            v for v in variants(args.models.split(","), args.device) if v[0] == args.profile
        )
        res = resolutions[0]
        with use_backend(backend or "auto"):
            model = build(name, res, fused, args.tiny, args.device)
            measure(model, args.batch, res, args.device, True, 1, 2, not args.no_amp, False)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                measure(model, args.batch, res, args.device, True, 1, 0, not args.no_amp, False)
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = f"device: {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}"
    print(header)
    table = [
        "| variant | res | batch | mode | compile | img/s | ms/step | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        img_s = f"{r['img_s']:.1f}" if r["img_s"] else "-"
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
        peak = r["peak_gib"] if isinstance(r["peak_gib"], str) or r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        table.append(
            f"| {r['variant']} | {r['resolution']} | {r['batch']} | {r['mode']} | {r['compile']} | "
            f"{img_s} | {ms} | {peak} |"
        )
    print("\n".join(table))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        with open(args.out_dir / "benchmark.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (args.out_dir / "benchmark.md").write_text(header + "\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
