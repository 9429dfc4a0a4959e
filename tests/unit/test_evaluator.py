"""eval.py's checkpoint scoring, in-process: the checkpoint's own config decides the model and its
input unless the command line says otherwise; official files keep the composed config; errors
are one line."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import compose_cfg, read_metrics, tiny_vim

from shufflemamba.engine.evaluator import evaluate, run_eval
from shufflemamba.engine.trainer import run_training
from shufflemamba.errors import UserError
from shufflemamba.models import LayerwiseShuffle

# A run trained with overrides a user would otherwise have to retype for eval.py.
TRAINED = ["experiment=demo", "model.embed_dim=24", "model.depth=3", "data.img_size=24", "data.batch_size=32",
           "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    run_training(compose_cfg("train", TRAINED), run_dir)
    return run_dir


def _eval(*command_line: str) -> dict:
    return run_eval(compose_cfg("eval", list(command_line)), command_line=list(command_line))


def test_eval_takes_the_model_and_input_from_the_checkpoints_config(trained):
    best = trained / "checkpoints" / "best.pt"
    recorded = {r["weights"]: r["top1"] for r in read_metrics(trained) if r["split"] == "val"}
    result = _eval("experiment=demo", f"checkpoint={best}")  # no model / size overrides retyped
    assert (result["img_size"], result["num_images"]) == (24, 360)
    assert result["top1"] == recorded[result["weights"]] and result["weights"] == "ema"
    # the command line still wins: another resolution (the position embedding is resized) and the raw weights
    other = _eval("experiment=demo", f"checkpoint={best}", "data.img_size=32", "eval.ema=false")
    assert (other["img_size"], other["weights"]) == (32, "raw")


def test_an_official_file_without_a_config_uses_the_composed_model(tmp_path):
    import timm

    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_classes=10)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, path)
    overrides = ["experiment=demo", "model=vim_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=16",
                 "model.depth=2", f"checkpoint={path}"]  # fmt: skip
    result = _eval(*overrides)
    assert result["model"] == "vim_tiny_patch16_224" and result["num_images"] == 360
    with pytest.raises(UserError, match=r"checkpoint does not match the model.*\n.*mis-shaped"):
        _eval(*overrides[:-2], "model.depth=2", "model.embed_dim=24", f"checkpoint={path}")


def test_eval_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="^checkpoint is not set: pass checkpoint=/path/to/best.pt$"):
        _eval("experiment=demo")
    with pytest.raises(UserError, match="^checkpoint not found: /no/such.pt$"):
        _eval("experiment=demo", "checkpoint=/no/such.pt")


def _passes(shuffle_rate: float, **kw) -> dict:
    """evaluate() of a tiny ShuffleMamba on fixed random batches (already normalised); the global
    RNG must come out of it as it went in."""
    torch.manual_seed(0)
    model = tiny_vim("shufflemamba_tiny_patch16_224", shuffle_rate=shuffle_rate).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 7, (6,), generator=g), []) for _ in range(3)]
    state = torch.get_rng_state()
    result = evaluate(model, batches, lambda x, y: (x, y), contextlib.nullcontext, torch.device("cpu"), **kw)
    assert torch.equal(torch.get_rng_state(), state)  # a training run's streams are not disturbed
    result.pop("images_per_sec")
    return result


def test_monte_carlo_shuffle_averaging_is_reproducible_and_differs_only_through_the_shuffle(monkeypatch):
    plain = _passes(1.0)
    assert _passes(1.0, shuffle_samples=1) == plain  # K = 1 is the plain evaluation
    four = _passes(1.0, shuffle_samples=4, seed=3)
    assert four == _passes(1.0, shuffle_samples=4, seed=3)  # reproducible for a seed
    assert four["mc_loss"] != _passes(1.0, shuffle_samples=4, seed=4)["mc_loss"]  # another seed, other orders
    assert four["mc_loss"] != pytest.approx(four["loss"], rel=1e-4)  # the shuffled passes see other orders
    assert {k: four[k] for k in plain} == plain  # the plain pass beside them is untouched
    # with the shuffle's probability at 0 the passes are the plain pass: the shuffle is the only difference
    monkeypatch.setattr(LayerwiseShuffle, "probability", lambda self, i: 0.0)
    still = _passes(1.0, shuffle_samples=4, seed=3)
    assert (still["mc_top1"], still["mc_top5"]) == (still["top1"], still["top5"])
    assert still["mc_loss"] == pytest.approx(still["loss"], rel=1e-5)


def test_monte_carlo_averaging_needs_a_model_with_the_shuffle():
    with pytest.raises(UserError, match="eval.shuffle_samples=4 averages passes with the token shuffle on, but"):
        _passes(0.0, shuffle_samples=4)
