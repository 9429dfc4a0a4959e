"""The scripts users run: CPU smoke runs of the benchmarks, the metrics plot, a Hydra sweep."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import TINY, run_script, subprocess_env


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    proc = run_script(
        "scripts/benchmark.py",
        "models",
        "--device",
        "cpu",
        "--tiny",
        "--resolutions",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--models",
        "vim_tiny_patch16_224,vmamba_tiny,mambaout_tiny,deit_tiny_patch16_224",
        "--mixer",
        "--variants",
        "^(?!vmamba_tiny/torch-fused)",  # its four stage shapes would each compile chunk kernels
        "--out-dir",
        str(tmp_path),
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"variant"')]
    variants = {"vim_tiny_patch16_224/torch", "vmamba_tiny/torch", "mambaout_tiny", "deit_tiny_patch16_224"}
    variants |= {"vim_tiny_patch16_224/torch-fused"}
    assert {r["variant"] for r in rows} == variants
    assert all(r["img_s"] > 0 for r in rows)
    assert (tmp_path / "benchmark.csv").is_file() and "| variant |" in (tmp_path / "benchmark.md").read_text()
    with open(tmp_path / "benchmark.csv") as f:
        table = {(r["variant"], r["mode"]): r for r in csv.DictReader(f)}
    vim, deit = table["vim_tiny_patch16_224/torch", "train"], table["deit_tiny_patch16_224", "train"]
    ratio = float(vim["img_s"]) / float(deit["img_s"])
    assert float(vim["vs_deit"]) == pytest.approx(ratio) and vim["deit_ref"] == "deit_tiny_patch16_224"
    mixer = [json.loads(line)["mixer"] for line in proc.stdout.splitlines() if line.startswith('{"mixer"')]
    assert len(mixer) == 2 and all(m["fused_ms"] > 0 and m["unfused_ms"] > 0 for m in mixer)
    assert "| fused (1 conv + 1 scan) |" in (tmp_path / "benchmark.md").read_text()


@pytest.mark.slow
def test_kernel_benchmark_and_sweep_run_on_the_interpreter(tmp_path):
    """The GPU run's kernel stage, rehearsed on CPU: compare + sweep at the tiny shape (times meaningless)."""
    out, best = tmp_path / "kernels.json", tmp_path / "best.json"
    run_script("scripts/benchmark.py", "kernels", "--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0",
               "--sweep", "tiny", "--sweep-axes", "num_warps", "--json", str(out), "--best-out", str(best),
               env=subprocess_env(TRITON_INTERPRET="1"))  # fmt: skip
    report = json.loads(out.read_text())
    assert {r["variant"] for r in report["compare"]} == {
        "scan fwd+bwd triton",
        "scan fwd triton",
        "conv fwd+bwd triton",
    }
    assert all(r["ms"] > 0 for r in report["compare"] + report["sweep"]["rows"])
    assert [r["config"] for r in report["sweep"]["rows"]] == ["defaults", "num_warps=1", "num_warps=2", "num_warps=8"]
    assert json.loads(best.read_text())["tiny"]["ms"] > 0


def test_the_triton_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time compile for sm_90 with Triton's own compiler and ptxas: what the interpreter cannot
    show (a global that is not a constexpr, an op with no GPU lowering) fails here, not on the GPU."""
    proc = run_script("scripts/benchmark.py", "kernels", "--aot", "90", "--aot-configs", "32x4",
                      env=subprocess_env(TRITON_INTERPRET="0"))  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"kernel"')]
    kernels = {"scan_fwd", "scan_bwd", "conv_fwd", "conv_bwd_pre", "conv_bwd_x"}
    assert {r["kernel"] for r in rows} == kernels and all("error" not in r for r in rows), rows
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_loader_benchmark_runs_the_deit_pipeline_on_synthetic_jpegs_in_every_format(tmp_path):
    out = tmp_path / "loader.json"
    run_script(
        "scripts/benchmark.py",
        "loader",
        *("--num-images", "24", "--num-classes", "3", "--workers", "1", "--batch", "4", "--batches", "2"),
        *("--rounds", "1", "--index-shards", "3", "--index-members", "20", "--json", str(out)),
    )
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["batch_shape"] == [4, 3, 224, 224]
    assert 50 < result["mean_jpeg_kb"] < 200  # ImageNet-like file sizes, not tiny or noise-sized
    assert set(result["formats"]) == {"imagenet", "wds", "hf"}
    assert all(r["images_per_s"] > 0 and r["batch_shape"] == [4, 3, 224, 224] for r in result["formats"].values())
    assert result["index"]["samples"] == 60 and result["index"]["cached_load_s"] >= 0


def test_plot_metrics_draws_a_png(tmp_path):
    rows = [{"split": "train", "epoch": 0, "step": s, "loss": 2.0 / s, "lr": 1e-3, "world_size": 1} for s in (1, 2)]
    rows += [{"split": "val", "epoch": e, "top1": 50.0 + e, "weights": "raw", "world_size": 1} for e in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_script("scripts/plot_metrics.py", str(tmp_path))
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_hydra_sweep_runs_each_job_in_its_own_dir(tmp_path):
    run_script(
        "train.py",
        "-m",
        *TINY,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=2",
        "model.shuffle_rate=0.0,0.5",
        f"hydra.sweep.dir={tmp_path}",
    )
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.pt").is_file()
