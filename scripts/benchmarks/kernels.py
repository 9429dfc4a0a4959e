"""The mixer's kernels alone: our Triton scan (both directions by index, one launch) and conv
against mamba-ssm's grouped call and causal-conv1d, forward + backward, at the scan shapes of Vim-S
(224 / 512 / 1024 px) and VMamba-T's four stages; a sweep of the Triton launch configuration;
and, without a GPU, the kernels' static resource use (registers, spills) for a target GPU.

GPU (scripts/gpu_check.sh runs these):
    python scripts/benchmark.py kernels --json kernels.json
    python scripts/benchmark.py kernels --sweep vim_s_224,vim_s_1024,vmamba_t_s1 --best-out best.json
CPU, no GPU needed (ahead-of-time compile for sm_90 with Triton's bundled ptxas):
    python scripts/benchmark.py kernels --aot 90
CPU smoke run under Triton's interpreter (tiny shapes; the times mean nothing):
    TRITON_INTERPRET=1 python scripts/benchmark.py kernels --device cpu --tiny --sweep tiny

Each figure is the median of CUDA-event timed calls after warm-up; ``vs mamba-ssm`` divides
mamba-ssm's time by ours, measured in the same run; ``peak MiB`` is the memory a forward + backward
adds over its inputs. The sweep changes one knob of :class:`TritonConfig` at a time from the best so
far (coordinate descent) and records failures (a compile error, out of memory) as rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import statistics

import torch

import shufflemamba  # noqa: F401
from benchmarks.models import StepTimer
from shufflemamba import ops
from shufflemamba.ops import ScanArgs, ScanSettings, TritonConfig

VIM = ("forward", "reverse")
VMAMBA = ("forward", "columns", "reverse", "columns_reverse")
# name: (batch, (H, W) token map or None, E per direction, N, family). Vim-S: E = 2 x 384, L = grid + 1
# class token; the batch is the models benchmark's (128 at 224, scaled by (224 / res)^2).
SHAPES = {
    "vim_s_224": (128, (14, 14), 768, 16, "vim"),
    "vim_s_512": (24, (32, 32), 768, 16, "vim"),
    "vim_s_1024": (6, (64, 64), 768, 16, "vim"),
    "vmamba_t_s1": (128, (56, 56), 96, 1, "vmamba"),
    "vmamba_t_s2": (128, (28, 28), 192, 1, "vmamba"),
    "vmamba_t_s3": (128, (14, 14), 384, 1, "vmamba"),
    "vmamba_t_s4": (128, (7, 7), 768, 1, "vmamba"),
    "tiny": (2, (4, 4), 16, 4, "vim"),
}
SWEEP_AXES = {
    "block_d": [8, 16, 32, 64],
    "num_warps": [1, 2, 4, 8],
    "chunk": [16, 32, 64],
    "num_stages": [1, 2, 3],
    "programs_per_sm": [4, 8, 16],
    "max_registers": [0, 128, 96],
}


def _inputs(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """The scan and conv inputs of one shape, in our layout and in mamba-ssm's, as the models pass them."""
    batch, grid, channels, d_state, family = SHAPES[name]
    length = grid[0] * grid[1] + (family == "vim")
    k = 2 if family == "vim" else 4
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(dt)

    u = t(batch, length, 1 if family == "vmamba" else k, channels)
    xz = t(batch, length, 2 * channels)  # in_proj's output: x and z are views of it
    args = ScanArgs(
        u=u,
        delta=t(batch, length, k, channels, scale=0.5),
        A=-(torch.rand(k, channels, d_state, generator=g, device=device) * 4 + 0.2),
        B=t(batch, length, k, d_state),
        C=t(batch, length, k, d_state),
        D=t(k, channels, dt=torch.float32),
        z=xz[..., channels:].unsqueeze(2) if family == "vim" else None,
        delta_bias=t(k, channels, scale=0.5, shift=-1.0, dt=torch.float32),
        delta_softplus=True,
        directions=VIM if family == "vim" else VMAMBA,
        grid=None if family == "vim" else grid,
        combine="mean" if family == "vim" else "sum",
    )
    # mamba-ssm's grouped call on the stacked layout (directions materialised, channel-first)
    stacked = args.in_scan_order()
    channel_first = ScanArgs.from_channel_first(
        *(ScanArgs.to_channel_first(x).contiguous() for x in (stacked.u, stacked.delta)),
        stacked.A.reshape(k * channels, d_state),
        stacked.B.permute(0, 2, 3, 1).contiguous(),
        stacked.C.permute(0, 2, 3, 1).contiguous(),
        stacked.D.reshape(-1),
        None if stacked.z is None else ScanArgs.to_channel_first(stacked.z).contiguous(),
        stacked.delta_bias.reshape(-1),
        True,
    )
    conv_w = torch.randn(2, channels, 4, generator=g, device=device)
    conv_b = torch.randn(2, channels, generator=g, device=device)
    x = xz[..., :channels]
    xs = torch.cat([x, x.flip(1)], -1).transpose(1, 2).contiguous()  # mamba-ssm's stacked conv input
    return dict(args=args, channel_first=channel_first, x=x, conv_w=conv_w, conv_b=conv_b, xs=xs)


def _leaves(args: ScanArgs) -> tuple[ScanArgs, list[torch.Tensor]]:
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    fresh = {n: t.detach().requires_grad_() for n, t in zip(names, args.tensors(), strict=True) if t is not None}
    return args.replace(**fresh), list(fresh.values())


def _median_ms(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` after warm-up (the models benchmark's per-step timer)."""
    for _ in range(warmup):
        fn()
    return statistics.median(StepTimer(device).time(fn, repeats))


def _peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _scan_step(args: ScanArgs, settings: ScanSettings, backward: bool):
    leafy, leaves = _leaves(args)

    def step():
        if backward:
            y = ops.selective_scan(leafy, settings)
            torch.autograd.grad(y, leaves, torch.ones_like(y))
        else:
            with torch.no_grad():
                ops.selective_scan(args, settings)

    return step


def _time_row(name: str, label: str, step, device: str, repeats: int, warmup: int = 2) -> dict:
    row = {"shape": name, "variant": label}
    try:
        row["ms"] = _median_ms(step, device, repeats, warmup)
        row["peak_mib"] = _peak_mib(step, device)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # a compile error of one configuration must not lose the run
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def compare(names: list[str], device: str, dtype: torch.dtype, repeats: int, warmup: int, config: TritonConfig
            ) -> list[dict]:  # fmt: skip
    """Ours against mamba-ssm per shape: scan fwd+bwd and fwd, conv fwd+bwd; agreement of the outputs."""
    rows = []
    mamba = device == "cuda" and ops.cuda_kernels_available()
    triton = ScanSettings.resolve("triton", triton=config)
    for name in names:
        data = _inputs(name, device, dtype)
        group = []
        for backward in (True, False):
            mode = "fwd+bwd" if backward else "fwd"
            group.append(_time_row(name, f"scan {mode} triton", _scan_step(data["args"], triton, backward), device,
                                   repeats, warmup))  # fmt: skip
            if mamba:
                group.append(_time_row(name, f"scan {mode} mamba-ssm", _scan_step(data["channel_first"], ScanSettings(
                    "cuda"), backward), device, repeats, warmup))  # fmt: skip
        if SHAPES[name][4] == "vim":
            group += _conv_rows(name, data, device, repeats, warmup, config, mamba)
        if mamba:
            with torch.no_grad():  # the stacked call's (b, L, K, E) output is in scan order
                ours = ops.selective_scan(data["args"], triton).float()
                theirs = data["args"].from_scan_order(ops.selective_scan(data["channel_first"], "cuda").float())
            group[0]["rel_diff_vs_mamba_ssm"] = ((ours - theirs).norm() / theirs.norm()).item()
        for row in group:
            other = next((r for r in group if r["variant"] == row["variant"].replace("triton", "mamba-ssm")
                          and r is not row and r.get("ms")), None)  # fmt: skip
            if "triton" in row["variant"] and other and row.get("ms"):
                row["vs_mamba_ssm"] = other["ms"] / row["ms"]
            print(json.dumps(row), flush=True)
        rows += group
    return rows


def _conv_rows(name, data, device, repeats, warmup, config, mamba) -> list[dict]:
    x = data["x"].detach().requires_grad_()
    w, b = data["conv_w"].requires_grad_(), data["conv_b"].requires_grad_()
    settings = ScanSettings.resolve("triton", triton=config)

    def ours():
        out = ops.causal_conv1d(x, w, b, "silu", VIM, settings)
        torch.autograd.grad(out, [x, w, b], torch.ones_like(out))

    rows = [_time_row(name, "conv fwd+bwd triton", ours, device, repeats, warmup)]
    if mamba:
        from causal_conv1d import causal_conv1d_fn

        xs = data["xs"].requires_grad_()
        ws, bs = w.detach().reshape(-1, 4).requires_grad_(), b.detach().reshape(-1).requires_grad_()

        def theirs():
            out = causal_conv1d_fn(xs, ws, bs, activation="silu")
            torch.autograd.grad(out, [xs, ws, bs], torch.ones_like(out))

        rows.append(_time_row(name, "conv fwd+bwd mamba-ssm", theirs, device, repeats, warmup))
    return rows


def sweep(
    names: list[str], axes: list[str], device: str, dtype: torch.dtype, repeats: int, warmup: int, start: TritonConfig
) -> dict:
    """Coordinate descent over ``axes`` (of SWEEP_AXES) per shape, scan fwd+bwd; every tried configuration
    is a row."""
    result = {"rows": [], "best": {}}
    for name in names:
        data = _inputs(name, device, dtype)
        best, best_ms, tried = start, None, {}
        for axis, values in [("start", [None]), *((a, SWEEP_AXES[a]) for a in axes)]:
            for value in values:
                config = best if axis == "start" else dataclasses.replace(best, **{axis: value})
                key = tuple(config.as_list())
                if key not in tried:
                    step = _scan_step(data["args"], ScanSettings.resolve("triton", triton=config), True)
                    row = _time_row(name, "scan fwd+bwd triton", step, device, repeats, warmup)
                    row["config"] = _text(config)
                    tried[key] = row
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                ms = tried[key].get("ms")
                if ms is not None and (best_ms is None or ms < best_ms):
                    best, best_ms = config, ms
        result["best"][name] = {"config": _text(best), "ms": best_ms}
        print(json.dumps({"best": name, **result["best"][name]}), flush=True)
    return result


def _text(config: TritonConfig) -> str:
    """The fields that differ from the defaults, as SHUFFLEMAMBA_TRITON_CONFIG takes them."""
    default = TritonConfig()
    changed = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(default, f.name)]  # fmt: skip
    return ",".join(changed) or "defaults"


# ---- static resource use, without a GPU --------------------------------------------------------
def aot_report(arch: int, configs: list[tuple[int, int]]) -> list[dict]:
    """Registers / spills / shared memory per kernel and (BLOCK_D, num_warps), compiled ahead of time
    for sm_<arch> by Triton's own compiler and ptxas (bf16 activations, N 16, the Vim flags)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("--aot compiles the real kernels: unset TRITON_INTERPRET")
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from shufflemamba.ops import triton_kernels as kern

    target = GPUTarget("cuda", arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    bf16 = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "g_ptr", "du_ptr", "ddelta_ptr", "dz_ptr",
            "x_ptr", "dx_ptr"}  # fmt: skip
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, ALL_DIRECTIONS=True, CHUNK=32, BLOCK_N=16,
                 NUM_STAGES=1)  # fmt: skip
    kernels = {
        "scan_fwd": (kern.scan_fwd_kernel, dict(flags, ACCUMULATE=True, SAVE_STATES=True)),
        "scan_bwd": (kern.scan_bwd_kernel, dict(flags, ACC_DU=False, ACC_DZ=True)),
        "conv_fwd": (kern.conv_fwd_kernel, dict(HAS_BIAS=True, SILU=True, WIDTH=4)),
        "conv_bwd_pre": (kern.conv_bwd_pre_kernel, dict(HAS_BIAS=True, SILU=True, WIDTH=4)),
        "conv_bwd_x": (kern.conv_bwd_x_kernel, dict(WIDTH=4)),
    }
    default = TritonConfig()  # the conv kernels at their shipped tile and warps
    conv_tile = dict(BLOCK_L=default.conv_block_l, BLOCK_E=default.conv_block_e)
    rows = []
    for name, (fn, constexprs) in kernels.items():
        if name.startswith("conv"):
            constexprs = dict(constexprs, **conv_tile)
        for block_d, warps in configs if name.startswith("scan") else [(0, default.conv_warps)]:
            const = dict(constexprs, **({"BLOCK_D": block_d} if block_d else {}))
            signature = {}
            for param in inspect.signature(fn.fn).parameters:
                if param in const:
                    signature[param] = "constexpr"
                elif param.endswith("_ptr"):
                    signature[param] = "*bf16" if param in bf16 else "*fp32"
                else:
                    signature[param] = "fp32" if param == "scale" else "i32"
            row = {"kernel": name, "block_d": block_d or None, "num_warps": warps, "arch": f"sm_{arch}"}
            try:
                compiled = triton.compile(ASTSource(fn, signature, const), target=target, options={"num_warps": warps})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
                found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", dump.stdout)
                if found:
                    row.update(registers=int(found[1]), stack_bytes=int(found[2]), shared_bytes=int(found[3]))
                else:
                    row["error"] = f"cuobjdump: {dump.stdout[-200:]} {dump.stderr[-200:]}"
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="vim_s_224,vim_s_512,vim_s_1024,vmamba_t_s1,vmamba_t_s2,vmamba_t_s3,vmamba_t_s4")
    p.add_argument("--tiny", action="store_true", help="the tiny shape only (an interpreter smoke run)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--config", default="", help="Triton config to compare, e.g. 'block_d=32,chunk=64'")
    p.add_argument("--sweep", default=None, help="comma list of shapes to sweep the Triton config on")
    p.add_argument("--sweep-axes", default=",".join(SWEEP_AXES), help="the TritonConfig fields swept, in order")
    p.add_argument("--best-out", default=None, help="write the sweep's best configuration per shape (JSON)")
    p.add_argument("--no-compare", action="store_true", help="only the sweep / the AOT report")
    p.add_argument("--aot", type=int, default=None, help="static resource use compiled for sm_<AOT> (no GPU needed)")
    p.add_argument("--aot-configs", default="8x1,16x1,32x1,16x4,32x4,64x4,32x8", help="BLOCK_Dxnum_warps list")
    p.add_argument("--json", default=None)


def run(args: argparse.Namespace) -> None:
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    if args.aot is not None:
        configs = [tuple(int(v) for v in item.split("x")) for item in args.aot_configs.split(",")]
        report["aot"] = aot_report(args.aot, configs)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = TritonConfig.parse(args.config)
    names = ["tiny"] if args.tiny else args.shapes.split(",")
    if args.aot is None and not args.no_compare:
        report["compare"] = compare(names, args.device, dtype, args.repeats, args.warmup, config)
    if args.sweep:
        axes = args.sweep_axes.split(",")
        unknown = sorted(set(axes) - set(SWEEP_AXES))
        if unknown:
            raise SystemExit(f"--sweep-axes: unknown {unknown}; choose from {', '.join(SWEEP_AXES)}")
        report["sweep"] = sweep(args.sweep.split(","), axes, args.device, dtype, args.repeats, args.warmup, config)
        if args.best_out:
            with open(args.best_out, "w") as f:
                json.dump(report["sweep"]["best"], f, indent=2)
    if "compare" in report:
        print(markdown(report["compare"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | variant | ms | peak MiB | vs mamba-ssm | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        vs = f"{r['vs_mamba_ssm']:.2f}x" if "vs_mamba_ssm" in r else "-"
        notes = r.get("error", "")
        if "rel_diff_vs_mamba_ssm" in r:
            notes = f"output rel. diff vs mamba-ssm {r['rel_diff_vs_mamba_ssm']:.1e}"
        lines.append(f"| {r['shape']} | {r['variant']} | {ms} | {peak} | {vs} | {notes} |")
    return "\n".join(lines) + "\n"
