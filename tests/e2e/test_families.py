"""VMamba, MambaOut and DeiT through the whole pipeline: configs, train.py, eval.py, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import evaluate_checkpoint, read_metrics, run_script

# Demo-sized overrides per family (the registered sizes run too, just slower).
DEMO_SIZED = {
    "vmamba": ["model=vmamba_tiny", "model.dims=16", "model.depths=[1,1,2,1]"],
    "mambaout": ["model=mambaout_femto", "model.dims=[16,24,32,48]", "model.depths=[1,1,2,1]"],
    "deit": [
        "model=deit_tiny_patch16_224",
        "model.patch_size=8",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
    ],
}
SHORT = ["experiment=demo", "data.batch_size=32", "trainer.epochs=2", "trainer.max_steps_per_epoch=5"]
SHORT += ["trainer.progress_bar=false"]


def test_train_py_refuses_a_shuffle_on_vmamba_before_reading_data(tmp_path):
    proc = run_script(
        "train.py", *SHORT, *DEMO_SIZED["vmamba"], "model.shuffle_rate=0.3", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode == 2
    assert "layer-wise token shuffle is only defined for the plain sequence models" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("family", sorted(DEMO_SIZED))
def test_each_family_trains_in_the_demo_setting_and_eval_reproduces_it(family, tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", *SHORT, *DEMO_SIZED[family], f"hydra.run.dir={run_dir}")
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert train and all(r["loss"] == r["loss"] for r in train)  # finite
    assert {r["epoch"] for r in val} == {0, 1} and all(r["num_images"] == 360 for r in val)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["config"]["model"]["name"] == DEMO_SIZED[family][0].split("=")[1]
    result = evaluate_checkpoint([*SHORT, *DEMO_SIZED[family]], run_dir / "checkpoints" / "best.pt", tmp_path)
    assert result["top1"] == pytest.approx(best["progress"]["best_top1"], abs=0) and result["num_images"] == 360
