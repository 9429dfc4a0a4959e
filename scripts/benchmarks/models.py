"""Training-step and inference throughput (images/s) and peak memory: our models on each scan
path (Vim / ShuffleMamba, VMamba) against timm's DeiT and MambaOut, at several resolutions, with
bf16 autocast, with/without torch.compile; plus the bidirectional mixer alone, fused against the
official two-call structure.

GPU (what the numbers in docs/benchmarks.md come from; scripts/gpu_check.sh runs it):
    python scripts/benchmark.py models --out-dir bench/ --mixer --models \
        vim_small_patch16_224,shufflemamba_base_patch16_224,vmamba_tiny,deit_small_patch16_224,deit_base_patch16_224
CPU, Vim-T against DeiT-T, interleaved over 5 rounds (a noisy machine hurts both alike):
    python scripts/benchmark.py models --device cpu --no-amp --resolutions 224 --batch 8 --steps 3 \
        --rounds 5 --models vim_tiny_patch16_224,deit_tiny_patch16_224
CPU smoke test (tiny sizes, so CI can run it):
    python scripts/benchmark.py models --device cpu --tiny --resolutions 64 --batch 2 --steps 2 --warmup 1

Variants: "<vim>/triton", "<vim>/triton+shuffle0.5" (training only; our Triton kernels, on any
GPU), "<vim>/cuda-fused", "<vim>/cuda-unfused", "<vim>/cuda-fused+shuffle0.5" (mamba-ssm, where
its kernels import), "<vim>/torch" and "<vim>/torch-fused" (the torch scan with eager /
Inductor-compiled chunks; on CPU or with --torch-path) for the Vim family; "<vmamba>/triton",
"<vmamba>/cuda", "<vmamba>/torch(-fused)" for VMamba; the bare name for timm's models. Every
Vim-family variant sets its shuffle rate explicitly (0 unless named), so a
size's registry default does not leak into the comparison. ``--variants REGEX`` keeps matching
labels; ``--compile both --compile-variants REGEX`` compiles only the matching ones.

Each row is timed per step (CUDA events on GPU) and the median is reported; ``vs DeiT`` divides
by the DeiT row of the closest parameter count at the same resolution, mode and compile setting,
measured in the same run. A variant that fails (out of memory, a compile error) is recorded with
its error instead of stopping the run. ``--profile VARIANT`` writes a profiler table of one
training step of that variant at the first resolution (``--profile-out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import shufflemamba  # noqa: F401
from shufflemamba.models.vim import BiMambaMixer
from shufflemamba.ops import ScanSettings, cuda_kernels_available, triton_available

OURS = ["vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224"]
DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
VMAMBA = ["vmamba_tiny", "vmamba_small", "vmamba_base"]
MSVMAMBA = ["msvmamba_nano", "msvmamba_micro", "msvmamba_tiny"]
MAMBAOUT = ["mambaout_tiny", "mambaout_small", "mambaout_base"]
VIM_FAMILY = ("vim_", "shufflemamba_")
SHUFFLE_RATE = 0.5
# 2-layer-ish versions of each family for --tiny smoke runs
TINY_KWARGS = {
    "vim_": dict(depth=2, embed_dim=32),
    "shufflemamba_": dict(depth=2, embed_dim=32),
    "deit": dict(depth=2, embed_dim=64, num_heads=2),
    "vmamba_": dict(dims=16, depths=(1, 1, 1, 1)),
    "msvmamba_": dict(dims=16, depths=(1, 1, 1, 1)),
    "mambaout_": dict(dims=(16, 24, 32, 48), depths=(1, 1, 1, 1)),
}


@dataclass(frozen=True)
class Variant:
    label: str
    model: str
    backend: str | None  # scan backend the model is built with; None for timm's own models
    kwargs: dict = field(default_factory=dict)
    train_only: bool = False
    knobs: dict = field(default_factory=dict)  # ScanSettings knobs (the torch path's fused chunks)

    def scan_settings(self) -> ScanSettings | None:
        return ScanSettings.resolve(self.backend, **self.knobs) if self.backend else None


def _torch_path(label: str, name: str, **kwargs) -> list[Variant]:
    """The pure-PyTorch scan with eager chunks, and with Inductor-compiled chunks (CPU)."""
    return [
        Variant(f"{label}/torch", name, "torch", kwargs, knobs={"fused": "0"}),
        Variant(f"{label}/torch-fused", name, "torch", kwargs, knobs={"fused": "1"}),
    ]


def variants(models: list[str], device: str, torch_path: bool) -> list[Variant]:
    """Every measurable variant of these models on this device."""
    out = []
    kernels = device == "cuda" and cuda_kernels_available()
    triton = device == "cuda" and triton_available("cuda")
    for name in models:
        if name.startswith(VIM_FAMILY):
            if triton:
                out += [
                    Variant(f"{name}/triton", name, "triton", dict(shuffle_rate=0.0)),
                    Variant(
                        f"{name}/triton+shuffle{SHUFFLE_RATE}",
                        name,
                        "triton",
                        dict(shuffle_rate=SHUFFLE_RATE),
                        train_only=True,
                    ),  # fmt: skip
                ]
            if kernels:
                out += [
                    Variant(f"{name}/cuda-fused", name, "cuda", dict(fused_directions=True, shuffle_rate=0.0)),
                    Variant(f"{name}/cuda-unfused", name, "cuda", dict(fused_directions=False, shuffle_rate=0.0)),
                    Variant(
                        f"{name}/cuda-fused+shuffle{SHUFFLE_RATE}",
                        name,
                        "cuda",
                        dict(fused_directions=True, shuffle_rate=SHUFFLE_RATE),
                        train_only=True,
                    ),
                ]
            if torch_path or not (kernels or triton):
                out += _torch_path(name, name, fused_directions=True, shuffle_rate=0.0)
        elif name.startswith(("vmamba_", "msvmamba_")):
            if triton:
                out.append(Variant(f"{name}/triton", name, "triton"))
            if kernels:
                out.append(Variant(f"{name}/cuda", name, "cuda"))
            if torch_path or not (kernels or triton):
                out += _torch_path(name, name)
        else:
            out.append(Variant(name, name, None))
    return out


def build(variant: Variant, res: int, tiny: bool, device: str) -> torch.nn.Module:
    kw = dict(variant.kwargs)
    if variant.model.startswith((*VIM_FAMILY, "deit")):  # fixed-grid models; the conv hierarchies take any size
        kw["img_size"] = res
    if tiny:
        kw.update(next(v for prefix, v in TINY_KWARGS.items() if variant.model.startswith(prefix)))
    if variant.backend:
        kw["scan_backend"] = variant.scan_settings()
    return timm.create_model(variant.model, **kw).to(device)


class StepTimer:
    """Per-step wall time: CUDA events on GPU (no host sync inside the timed region), a host clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def time(self, fn, repeats: int) -> list[float]:
        """Milliseconds of each of ``repeats`` calls of fn."""
        if not self.cuda:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def measure(model, batch, res, device, train, steps, warmup, amp, compile_model, fullgraph=False) -> dict:
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fn = torch.compile(model, fullgraph=fullgraph) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda") if train else None
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

    start = time.perf_counter()
    step()  # first call: compilation, cuDNN/cuBLAS autotuning, allocator warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = statistics.median(StepTimer(device).time(step, steps))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"img_s": 1e3 * batch / ms, "ms_per_step": ms, "peak_gib": peak, "first_call_s": first_s}


def mixer_benchmark(device: str, amp: bool, tiny: bool, repeats: int) -> list[dict]:
    """BiMambaMixer forward+backward on each GPU backend (the torch path on CPU): both directions in
    one conv + one scan call (fused: read by index on triton, stacked on cuda / torch) against the
    official structure (one conv + one scan per direction), same weights, same input."""
    d_model = 32 if tiny else 384  # Vim-S width
    shapes = [(2, 17), (1, 65)] if tiny else [(128, 197), (32, 1025), (8, 4097)]  # 224 / 512 / 1024 px
    backends = [b for b, ok in (("triton", triton_available(device)), ("cuda", cuda_kernels_available())) if ok]
    backends = backends if device == "cuda" and backends else ["torch"]
    rows = []
    for backend in backends:
        for batch, length in shapes:
            torch.manual_seed(0)
            mixer = BiMambaMixer(d_model, scan_backend=backend).to(device)
            x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
            grad = torch.randn(batch, length, d_model, device=device)
            times = {}
            for fused in (True, False, True, False):  # ABAB: drift hits both
                mixer.fused_directions = fused

                def step(mixer=mixer, x=x, grad=grad):
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                        out = mixer(x)
                    out.backward(grad)

                for _ in range(3):
                    step()
                times.setdefault(fused, []).extend(StepTimer(device).time(step, repeats))
            fused_ms, unfused_ms = statistics.median(times[True]), statistics.median(times[False])
            rows.append(
                {
                    "batch": batch,
                    "length": length,
                    "d_model": d_model,
                    "backend": backend,
                    "fused_ms": fused_ms,
                    "unfused_ms": unfused_ms,
                    "speedup": unfused_ms / fused_ms,
                }
            )
            print(json.dumps({"mixer": rows[-1]}), flush=True)
    return rows


def closest_deit(row: dict, rows: list[dict]) -> dict | None:
    """The DeiT row of the closest parameter count at the same resolution, mode and compile setting."""
    peers = [
        r
        for r in rows
        if r["variant"].startswith("deit")
        and r.get("img_s")
        and (r["resolution"], r["mode"], r["compile"]) == (row["resolution"], row["mode"], row["compile"])
    ]
    return min(peers, key=lambda r: abs(math.log(r["params_m"] / row["params_m"])), default=None)


def add_ratios(rows: list[dict]) -> None:
    """vs DeiT (closest size); shuffle cost against the same model without it; fused over unfused."""
    by_key = {(r["variant"], r["resolution"], r["mode"], r["compile"]): r for r in rows}
    for r in rows:
        if not r.get("img_s"):
            continue
        deit = closest_deit(r, rows)
        if deit is not None and deit is not r:
            r["vs_deit"] = r["img_s"] / deit["img_s"]
            r["deit_ref"] = deit["variant"]
        key = (r["resolution"], r["mode"], r["compile"])
        if "+shuffle" in r["variant"]:
            base = by_key.get((r["variant"].split("+shuffle")[0], *key))
            if base and base.get("img_s"):
                r["shuffle_cost_pct"] = 100 * (1 - r["img_s"] / base["img_s"])
        if r["variant"].endswith("/cuda-fused"):
            unfused = by_key.get((r["variant"].replace("cuda-fused", "cuda-unfused"), *key))
            if unfused and unfused.get("img_s"):
                r["fused_vs_unfused"] = r["img_s"] / unfused["img_s"]


def _fmt(value, spec: str) -> str:
    if value is None or value == "":
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def markdown(rows: list[dict], mixer_rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | res | batch | mode | compile | img/s | ms/step | peak GiB | 1st call s | vs DeiT | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = []
        if "fused_vs_unfused" in r:
            notes.append(f"fused/unfused {r['fused_vs_unfused']:.2f}x")
        if "shuffle_cost_pct" in r:
            notes.append(f"shuffle cost {r['shuffle_cost_pct']:.1f}%")
        if r.get("error"):
            notes.append(r["error"])
        vs = f"{r['vs_deit']:.2f}x ({r['deit_ref'].split('_patch')[0]})" if "vs_deit" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['resolution']} | {r['batch']} | {r['mode']} | {r['compile']} | "
            f"{_fmt(r.get('img_s'), '.1f')} | {_fmt(r.get('ms_per_step'), '.1f')} | {_fmt(r.get('peak_gib'), '.2f')} "
            f"| {_fmt(r.get('first_call_s'), '.1f')} | {vs} | {'; '.join(notes)} |"
        )
    if mixer_rows:
        lines += [
            "",
            f"Bidirectional mixer alone, forward + backward (d_model {mixer_rows[0]['d_model']}, median ms):",
            "",
            "| backend | batch | L | fused (1 conv + 1 scan) | official (2 + 2) | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m['backend']} | {m['batch']} | {m['length']} | {m['fused_ms']:.2f} | {m['unfused_ms']:.2f} | "
            f"{m['speedup']:.2f}x |"
            for m in mixer_rows
        ]
    return "\n".join(lines) + "\n"


def profile_step(variant: Variant, args, res: int) -> str:
    """Profiler table (by self device time) of one training step, after warm-up."""
    model = build(variant, res, args.tiny, args.device)
    measure(model, args.batch, res, args.device, True, 1, 2, not args.no_amp, False)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        measure(model, args.batch, res, args.device, True, 1, 0, not args.no_amp, False)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    title = (
        f"one training step (timed twice inside: first call + 1 step) of {variant.label}, batch {args.batch}, {res}px"
    )
    return title + "\n" + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(OURS + VMAMBA + MSVMAMBA + DEIT + MAMBAOUT))
    p.add_argument("--variants", default=None, help="regex: keep only matching variant labels")
    p.add_argument("--torch-path", action="store_true", help="also the pure-PyTorch scan path when kernels exist")
    p.add_argument("--resolutions", default="224,512,1024")
    p.add_argument(
        "--batch", type=int, default=128, help="images per step at 224 (scaled down by (224/res)^2 above 224)"
    )
    p.add_argument("--modes", default="train,inference")
    p.add_argument("--compile", default="off", help="off | on | both")
    p.add_argument("--compile-variants", default=None, help="regex: compile only these labels (others: off)")
    p.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True (a graph break fails)")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="measure all variants round-robin this many times")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="2-layer models (smoke tests)")
    p.add_argument("--mixer", action="store_true", help="also time the bidirectional mixer, fused vs official")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--name", default="benchmark", help="output file stem in --out-dir")
    p.add_argument("--profile", default=None, help="variant label to profile for one training step")
    p.add_argument("--profile-out", type=Path, default=None)


def measure_job(job: tuple, args: argparse.Namespace) -> dict:
    """One row: build the variant, time it; a failure (OOM, compile error) is recorded, not raised."""
    variant, res, batch, mode, compiled = job
    row = {
        "variant": variant.label,
        "resolution": res,
        "batch": batch,
        "mode": mode,
        "compile": compiled,
        "amp": "fp32" if args.no_amp else "bf16",
    }
    model = None
    try:
        model = build(variant, res, args.tiny, args.device)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row.update(
            measure(model, batch, res, args.device, mode == "train", args.steps, args.warmup, not args.no_amp,
                    compiled, args.fullgraph)
        )  # fmt: skip
    except torch.OutOfMemoryError:
        row.update(img_s=None, ms_per_step=None, peak_gib="OOM", error="out of memory")
    except Exception as exc:  # one broken variant must not lose the rest of the run
        row.update(img_s=None, ms_per_step=None, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        model = None
        if compiled:
            torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def combine_rounds(runs: list[dict]) -> dict:
    """Median img/s and ms/step over the rounds that succeeded; the largest peak memory."""
    good = [r for r in runs if r.get("img_s")]
    if not good:
        return runs[-1]
    row = dict(good[0])
    row["img_s"] = statistics.median(r["img_s"] for r in good)
    row["ms_per_step"] = statistics.median(r["ms_per_step"] for r in good)
    peaks = [r["peak_gib"] for r in good if isinstance(r.get("peak_gib"), float)]
    row["peak_gib"] = max(peaks) if peaks else row.get("peak_gib")
    row["rounds"] = len(good)
    return row


def run(args: argparse.Namespace) -> None:
    resolutions = [int(r) for r in args.resolutions.split(",")]
    compile_opts = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    torch_path = args.torch_path or args.device == "cpu"
    all_variants = variants(args.models.split(","), args.device, torch_path)
    chosen = [v for v in all_variants if args.variants is None or re.search(args.variants, v.label)]
    jobs = []  # (variant, res, batch, mode, compiled)
    for variant in chosen:
        for res in resolutions:
            batch = max(1, round(args.batch * min(1.0, (224 / res) ** 2)))
            for mode in args.modes.split(","):
                if variant.train_only and mode != "train":
                    continue
                for compiled in compile_opts:
                    if compiled and args.compile_variants and not re.search(args.compile_variants, variant.label):
                        continue
                    jobs.append((variant, res, batch, mode, compiled))
    # --rounds N measures every job once per round, round-robin (A B C, A B C, ...): drift on a
    # noisy machine hits all variants alike; each figure is the median over the rounds.
    measured: list[list[dict]] = [[] for _ in jobs]
    for _ in range(args.rounds):
        for runs, job in zip(measured, jobs, strict=True):
            runs.append(measure_job(job, args))
            print(json.dumps(runs[-1]), flush=True)
    rows = [combine_rounds(runs) for runs in measured]

    add_ratios(rows)
    mixer_rows = mixer_benchmark(args.device, not args.no_amp, args.tiny, args.steps) if args.mixer else []

    if args.profile:
        variant = next((v for v in all_variants if v.label == args.profile), None)
        if variant is None:
            raise SystemExit(
                f"--profile {args.profile!r}: no such variant; choose from {[v.label for v in all_variants]}"
            )
        table = profile_step(variant, args, resolutions[0])
        print(table)
        if args.profile_out:
            args.profile_out.parent.mkdir(parents=True, exist_ok=True)
            args.profile_out.write_text(table + "\n")

    on_gpu = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    header = (
        f"device: {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}, "
        f"{'fp32' if args.no_amp else 'bf16 autocast'}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    text = markdown(rows, mixer_rows, header)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if rows:
            fieldnames = list(dict.fromkeys(k for r in rows for k in r))
            with open(args.out_dir / f"{args.name}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
        (args.out_dir / f"{args.name}.md").write_text(text)
