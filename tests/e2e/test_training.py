"""End-to-end training and evaluation through train.py / eval.py, as users run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import (
    ROOT,
    TINY,
    compose_cfg,
    read_metrics,
    run_script,
    start_run,
    subprocess_env,
    wait_for_checkpoints,
)
from PIL import Image

from shufflemamba.ops import cuda_kernels_available

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_train_then_eval_reproduces_the_recorded_top1(tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", *TINY, f"hydra.run.dir={run_dir}")
    rows = read_metrics(run_dir)
    assert all(r["world_size"] == 1 for r in rows)
    val = [r for r in rows if r["split"] == "val"]
    assert {r["epoch"] for r in val} == {0, 1} and all(r["num_images"] == 360 for r in val)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)  # plain containers only
    components = {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "progress", "rng"}
    assert set(best) == components | {"best_weights", "config"}
    recorded = max(r["top1"] for r in val if r["weights"] == best["best_weights"])
    assert recorded == pytest.approx(best["progress"]["best_top1"], abs=0)
    # the epoch line a person reads: train loss, speed, time and ETA beside the val top-1
    epoch_lines = [ln for ln in (run_dir / "train.log").read_text().splitlines() if "epoch 1: train loss" in ln]
    assert len(epoch_lines) == 1 and all(k in epoch_lines[0] for k in ("img/s", "ETA", "val top-1 raw", "best"))
    assert all({"train_loss", "train_img_per_sec", "epoch_seconds"} <= set(r) for r in val)
    # eval.py needs only the checkpoint: the model and its input come from the config it carries
    out = tmp_path / "eval.json"
    run_script("eval.py", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "data=demo", f"output={out}",
               f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    result = json.loads(out.read_text())
    assert result["top1"] == recorded and result["num_images"] == 360
    assert {"top1", "top5", "loss", "num_images", "images_per_sec"} <= set(result)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {
        **{f"model.{k}": v for k, v in ckpt["model"].items()},
        **{f"ema.{k}": v for k, v in ckpt["model_ema"].items()},
    }


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


RESUME = [
    *TINY,
    "trainer.deterministic=true",
    "checkpoint.every_steps=2",
    "trainer.epochs=3",
    "aug=deit",
    "aug.repeated_aug=2",
    "model.drop_path_rate=0.1",
    "model.shuffle_rate=0.5",
    "data.num_workers=1",
]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_and_resume_is_bitwise_exact_on_tar_shards(image_sets, tmp_path):
    """Read at random from tar shards (workers keep shard files open across the kill), with
    repeated augmentation, drop path and the shuffle on: the killed and resumed run ends bitwise
    where an uninterrupted one does. (The two-rank tests below cover the demo data.)"""
    shards = ["data=wds", f"data.root={image_sets['wds']}", "data.num_classes=4",
              f"data.index_cache_dir={tmp_path / 'cache'}", "data.index_workers=1"]  # fmt: skip
    overrides = [*RESUME, *shards]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    run_script("train.py", *overrides, f"hydra.run.dir={ref_dir}")
    last = run_dir / "checkpoints" / "last.pt"
    for kill_after in (1, 4):  # mid-epoch, then again later, resuming a resumed run
        proc = start_run(overrides, run_dir)
        seen = wait_for_checkpoints(proc, run_dir, count=kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert seen == kill_after, "the run ended before it could be killed"
    run_script("train.py", *overrides, f"hydra.run.dir={run_dir}")  # checkpoint.resume=auto by default
    _assert_bitwise_equal(_weights(ref_dir / "checkpoints" / "last.pt"), _weights(last))


WORLD_FREE = [  # no model-side randomness: what is left must not depend on the world size
    *TINY,
    "data.batch_size=16",
    "trainer.global_batch=64",
    "trainer.deterministic=true",
    "checkpoint.every_steps=2",
    "model.shuffle_rate=0.0",
    "model.drop_path_rate=0.0",
]


def _kill_after_first_checkpoint(overrides: list[str], run_dir: Path, nproc: int) -> None:
    """Start a torchrun group and SIGKILL all of it once it has written last.pt (mid-epoch)."""
    proc = start_run(overrides, run_dir, nproc)
    written = wait_for_checkpoints(proc, run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert written == 1, "the run ended before writing a checkpoint"


@pytest.mark.slow
def test_a_two_rank_run_killed_mid_epoch_resumes_on_one_rank_with_the_same_weights(tmp_path):
    """With the batch-level augmentation on (erasing, mixup / cutmix keyed by place in the order):
    two ranks killed mid-epoch, resumed on one, end where one rank alone does."""
    aug = ["aug=none", "aug.mixup=0.8", "aug.cutmix=1.0", "aug.reprob=0.25"]
    overrides = [*WORLD_FREE, *aug]
    reference, run_dir = tmp_path / "one_rank", tmp_path / "killed"
    run_script("train.py", *overrides, f"hydra.run.dir={reference}")
    _kill_after_first_checkpoint(overrides, run_dir, nproc=2)
    killed_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert killed_at["epoch"] == 0 and killed_at["sample_in_epoch"] == 2 * 64  # after 2 updates of epoch 0
    proc = run_script("train.py", *overrides, f"hydra.run.dir={run_dir}")  # one process: 16 x 1 x 4
    assert "RNG streams restart" in proc.stderr and "resumed from" in proc.stderr

    a, b = _weights(reference / "checkpoints" / "last.pt"), _weights(run_dir / "checkpoints" / "last.pt")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs weight difference, 1 rank vs 2 ranks killed + resumed on 1 ({aug}): {worst:.3g}")
    assert worst <= 1e-4, worst
    rows = read_metrics(run_dir)
    setup = [r for r in rows if r["split"] == "setup"]
    assert [(r["world_size"], r["batch_size"], r["accum_steps"], r["global_batch"]) for r in setup] == [
        (2, 16, 2, 64),
        (1, 16, 4, 64),
    ]
    # distributed evaluation on two ranks: every val image once, the top-1 that training recorded
    val = [r for r in rows if r["split"] == "val" and r["weights"] == "raw"][-1]
    out = tmp_path / "r.json"
    run_script("eval.py", "data=demo", f"checkpoint={run_dir}/checkpoints/last.pt", "eval.ema=false",
               f"output={out}", f"hydra.run.dir={tmp_path / 'eval'}", torchrun=2)  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["num_images"], result["top1"], result["world_size"]) == (360, val["top1"], 2)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            "trainer.epochs=50",
            "trainer.log_every_steps=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["progress"]["global_step"] >= 1 and "stop requested" in err


def test_wandb_offline_writes_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", *TINY, "trainer.epochs=1", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={run_dir}")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    run_id = ckpt["progress"]["wandb_run_id"]
    assert run_id and run_id in runs[0].name


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The scripts' contract; each message is checked in-process (unit/test_trainer.py, test_evaluator.py)."""
    line = _error_line(run_script("train.py", *TINY, "data=imagenet", f"hydra.run.dir={tmp_path / 'r'}", check=False))
    assert line == "error: data.root is not set: pass data.root=/path/to/the/data (data=imagenet)"
    line = _error_line(run_script("eval.py", "checkpoint=/no/such.pt", f"hydra.run.dir={tmp_path / 'e'}", check=False))
    assert line == "error: checkpoint not found: /no/such.pt"


@pytest.mark.slow
def test_a_depth_2_model_trains_on_the_triton_kernels_to_the_torch_backends_losses(tmp_path):
    """model.scan_backend=triton through train.py as a user runs it; without a GPU its kernels run on the
    CPU under Triton's interpreter (TRITON_INTERPRET=1, from conftest). Same steps, same losses as torch
    (the demo's ShuffleMamba, shuffle on: the same seeded draws); the log names the backend that ran."""
    small = ["experiment=demo", "data=fake", "data.img_size=32", "data.num_classes=7", "data.num_train=6",
             "data.num_val=2", "data.batch_size=2", "data.num_workers=0", "model.embed_dim=16", "model.depth=2",
             "trainer.epochs=1", "trainer.log_every_steps=1", "trainer.progress_bar=false"]  # fmt: skip
    losses, logs = {}, {}
    for backend in ("torch", "triton"):
        run_dir = tmp_path / backend
        run_script("train.py", *small, f"model.scan_backend={backend}", f"hydra.run.dir={run_dir}")
        losses[backend] = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
        logs[backend] = (run_dir / "train.log").read_text()
        setup = next(r for r in read_metrics(run_dir) if r["split"] == "setup")
        assert setup["scan"].startswith(f"scan backend {backend}")
    assert len(losses["triton"]) == 3 and all(torch.isfinite(torch.tensor(losses["triton"])))
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)
    assert "scan backend triton (block_d=0" in logs["triton"]


def test_repeated_non_finite_losses_stop_the_run_with_the_last_checkpoint_intact(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script(
        "train.py",
        *TINY,
        "trainer.epochs=3",
        "optim.base_lr=1e12",
        "trainer.max_nonfinite_steps=2",
        "checkpoint.every_steps=1",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    line = _error_line(proc)
    assert "2 consecutive non-finite losses" in line and "last.pt" in line
    assert "non-finite loss at update" in proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # still loads
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # no update with a NaN was saved
    assert ckpt["progress"]["nonfinite_steps"] == 0 and 1 <= ckpt["progress"]["global_step"] < 15


def test_eval_on_an_image_folder_with_known_labels(tmp_path):
    """Accuracy from eval.py equals the one computed image by image; odd images are handled."""
    import numpy as np

    from shufflemamba.data.transforms import build_eval_transform
    from shufflemamba.engine.builders import resolve_input_settings

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "val"):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(6):
                arr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
                img = Image.fromarray(arr)
                if i == 0:
                    img = img.convert("L")  # grayscale
                elif i == 1:
                    img = img.convert("CMYK")
                elif i == 2:
                    img = img.convert("RGBA")
                path = d / (f"{i}.jpg" if img.mode in ("L", "CMYK") else f"{i}.png")
                img.save(path)
                if split == "val":
                    files.append((path, c))
    (root / "val" / "class0" / "broken.jpg").write_bytes(b"not an image")

    torch.manual_seed(0)
    model = timm.create_model(
        "vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=3
    ).eval()
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    overrides = [
        "model=vim_tiny_patch16_224",
        "data=imagenet",
        f"data.root={root}",
        "data.num_classes=3",
        "data.img_size=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "model.patch_size=8",
        "model.embed_dim=32",
        "model.depth=2",
        "eval.device=cpu",
    ]
    out = tmp_path / "r.json"
    proc = run_script(
        "eval.py",
        *overrides,
        f"checkpoint={ckpt}",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'e'}",
        "data.index_cache_dir=" + str(tmp_path / "cache"),
    )
    result = json.loads(out.read_text())
    assert "broken.jpg" in proc.stderr  # the warning names the file

    cfg = compose_cfg("eval", [*overrides, "checkpoint=x", f"data.root={root}"])
    resolve_input_settings(cfg.data, model)  # crop, mean / std: the model's, as eval.py takes them
    transform = build_eval_transform(cfg.data)
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(3, 1, 1) * 255
    correct = 0
    with torch.no_grad():
        for path, label in files:
            x = (torch.from_numpy(np.asarray(transform(Image.open(path).convert("RGB")))).float() - mean) / std
            correct += int(model(x[None]).argmax(1).item() == label)
    assert result["num_images"] == len(files) == 18
    assert result["top1"] == pytest.approx(100.0 * correct / len(files), abs=1e-9)


@pytest.mark.slow
def test_torchrun_restarts_a_dead_rank_and_the_run_resumes_bitwise(tmp_path):
    """A rank killed mid-run makes torchrun (--max-restarts) restart the group; checkpoint.resume=auto
    picks up last.pt in the same run dir, and the result equals an uninterrupted run."""
    common = [*RESUME, "data.batch_size=16", "data.num_workers=0", "trainer.epochs=2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "restarted"
    run_script("train.py", *common, f"hydra.run.dir={ref_dir}", torchrun=2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "train.py",
        *common,
        f"hydra.run.dir={run_dir}",
    ]
    agent = subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-3000:]
    assert "resumed from" in out
    _assert_bitwise_equal(_weights(ref_dir / "checkpoints" / "last.pt"), _weights(last))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA GPU with mamba-ssm and causal-conv1d")
def test_ddp_world_size_one_under_torchrun_on_gpu(tmp_path):
    run_dir = tmp_path / "run"
    run_script(
        "train.py", *TINY, "trainer.device=cuda", "trainer.precision=bf16", f"hydra.run.dir={run_dir}", torchrun=1
    )
    rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.slow
def test_trainer_compile_trains_and_resumes_the_demo(tmp_path):
    """trainer.compile=true: the whole model is one compiled graph; a killed run resumes from last.pt."""
    overrides = [*TINY, "trainer.compile=true", "checkpoint.every_steps=3", "trainer.epochs=2"]
    run_dir = tmp_path / "run"
    proc = start_run(overrides, run_dir)
    written = wait_for_checkpoints(proc, run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert written == 1
    resumed = run_script("train.py", *overrides, f"hydra.run.dir={run_dir}")
    assert "resumed from" in resumed.stderr and "done: best val top-1" in resumed.stderr
    losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
