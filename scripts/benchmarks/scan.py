"""The CPU torch scan path: selective scan forward+backward at (B, L, E, N) = (8, 197, 384, 16),
our chunked torch path against the shipped sequential reference (``shufflemamba.ops.reference``,
one step at a time, autograd through it), with the outputs and gradients compared. (Whole models
against DeiT: the ``models`` mode; the Triton kernels: the ``kernels`` mode.)

    python scripts/benchmark.py scan [--batch 8] [--repeats 5] [--json out.json]

Also, for the analysis in docs/benchmarks.md:
    --chunk-sweep 131072,1048576   fused bidirectional scan (B 8, 2E 768, L 197, N 16) per chunk size
    --inductor-chunk               one chunk compiled by torch.compile (Inductor) vs the same code eager
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch

import shufflemamba  # noqa: F401
from shufflemamba.ops import ScanArgs, ScanSettings, scan_fused, selective_scan, selective_scan_torch
from shufflemamba.ops.reference import selective_scan_reference
from shufflemamba.ops.scan_torch import chunk_len


def _scan_inputs(b, d, length, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, d, length, generator=g),
        torch.randn(b, d, length, generator=g) * 0.5,
        -(torch.rand(d, n, generator=g) * 4 + 0.2),
        torch.randn(b, n, length, generator=g),
        torch.randn(b, n, length, generator=g),
        torch.randn(d, generator=g),
        torch.randn(b, d, length, generator=g),
        torch.randn(d, generator=g) * 0.5 - 1,
    ]


def _fwd_bwd(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    start = time.perf_counter()
    y = fn(*leaves, delta_softplus=True)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start, y.detach(), [t.grad for t in leaves]


def bench_scan(batch: int, repeats: int) -> dict:
    inputs = _scan_inputs(batch, 384, 197, 16)
    _, y_ref, g_ref = _fwd_bwd(selective_scan_reference, inputs)
    reference = [_fwd_bwd(selective_scan_reference, inputs)[0] for _ in range(max(1, repeats // 2))]
    _fwd_bwd(selective_scan_torch, inputs)
    ours_runs = [_fwd_bwd(selective_scan_torch, inputs) for _ in range(repeats)]
    _, y, g = ours_runs[-1]
    max_err = max(
        [(y - y_ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g, g_ref, strict=True)]
    )
    t_reference, t_ours = statistics.median(reference), statistics.median(r[0] for r in ours_runs)
    return {
        "shape_BLEN": [batch, 197, 384, 16],
        "reference_ms": 1e3 * t_reference,
        "torch_path_ms": 1e3 * t_ours,
        "speedup": t_reference / t_ours,
        "max_abs_diff": max_err,
    }


def chunk_sweep(sizes: list[int], repeats: int) -> list[dict]:
    """Fused bidirectional layout (channels 2E = 768, grouped B/C): forward, backward, no-grad forward."""
    b, d, length, n = 8, 768, 197, 16
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(b, d, length, generator=g),
        torch.randn(b, d, length, generator=g) * 0.5,
        -(torch.rand(d, n, generator=g) * 4 + 0.2),
        torch.randn(b, 2, n, length, generator=g),
        torch.randn(b, 2, n, length, generator=g),
        torch.randn(d, generator=g),
        torch.randn(b, d, length, generator=g),
        torch.randn(d, generator=g) * 0.5 - 1,
    ]
    rows = []
    for size in sizes:
        settings = ScanSettings.resolve("torch", chunk_elements=size)

        def scan(*tensors, settings=settings):
            args = ScanArgs.from_channel_first(*tensors, delta_softplus=True)
            return ScanArgs.to_channel_first(selective_scan(args, settings))

        fwd, bwd, inf = [], [], []
        for _ in range(repeats):
            leaves = [t.clone().requires_grad_() for t in inputs]
            t0 = time.perf_counter()
            y = scan(*leaves)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            with torch.no_grad():
                scan(*inputs)
            t3 = time.perf_counter()
            fwd.append(t1 - t0), bwd.append(t2 - t1), inf.append(t3 - t2)
        rows.append(
            {
                "chunk_elements": size,
                "T": chunk_len(b, d, n, length, size),
                "fwd_ms": 1e3 * min(fwd),
                "bwd_ms": 1e3 * min(bwd),
                "nograd_fwd_ms": 1e3 * min(inf),
            }
        )
    return rows


def inductor_chunk(repeats: int, T: int = 8) -> dict:
    """No-grad scan of (B 8, G 2, dg 384, N 16, L 192) in chunks of T: compiled vs eager."""
    b, groups, dg, n, length = 8, 2, 384, 16, 192
    g = torch.Generator().manual_seed(0)
    dt = torch.rand(length, b, groups, dg, generator=g) * 0.1
    dtu = torch.randn(length, b, groups, dg, generator=g)
    A = -torch.rand(groups, n, dg, generator=g) * 4
    chunk_eager = scan_fused.chunk_forward  # the shipped chunk (discretise + recur + contract)
    Bm, Cm = torch.randn(length, b, groups, n, generator=g), torch.randn(length, b, groups, n, generator=g)

    def run(fn):
        h, ys = torch.zeros(b, groups, n, dg), []
        for s in range(0, length, T):
            y, h = fn(dt[s : s + T], dtu[s : s + T], A, Bm[s : s + T], Cm[s : s + T], h)
            ys.append(y)
        return torch.cat(ys)

    compiled = torch.compile(chunk_eager, dynamic=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = run(compiled)
        compile_s = time.perf_counter() - t0
        times = {}
        for name, fn in (("inductor", compiled), ("eager", chunk_eager)):
            run(fn)
            times[name] = min(_timed(lambda fn=fn: run(fn)) for _ in range(repeats))
        err = (run(chunk_eager) - ref).abs().max().item()
    return {
        "T": T,
        "first_call_s": compile_s,
        "inductor_ms": 1e3 * times["inductor"],
        "eager_ms": 1e3 * times["eager"],
        "max_abs_diff": err,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--chunk-sweep", default=None, help="comma-separated chunk sizes (elements)")
    parser.add_argument("--inductor-chunk", action="store_true")


def run(args: argparse.Namespace) -> None:
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "scan": bench_scan(args.batch, args.repeats),
    }
    if args.chunk_sweep:
        report["chunk_sweep"] = chunk_sweep([int(c) for c in args.chunk_sweep.split(",")], args.repeats)
    if args.inductor_chunk:
        report["inductor_chunk"] = inductor_chunk(args.repeats)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
