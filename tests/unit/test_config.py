"""Configs: every model config and preset composes and builds, choices are checked in one line,
the data settings a config leaves open come from the model, the CLI answers fast."""

import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT, compose_cfg

from shufflemamba.engine.builders import resolve_input_settings
from shufflemamba.engine.choices import validate
from shufflemamba.errors import UserError
from shufflemamba.models import MSVMAMBA_SIZES, REG_SIZES, VIM_SIZES, VMAMBA_SIZES
from shufflemamba.models.from_config import model_kwargs

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if not p.stem.startswith("_"))
SIZE_TABLES = {**VIM_SIZES, **REG_SIZES}


def _built(cfg):
    name, kwargs = model_kwargs(cfg.model)
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _rates(model) -> tuple[float, float]:
    """(shuffle p_max, drop path of the last block) of a built model."""
    shuffle = model.shuffle.shuffle_rate if hasattr(model, "shuffle") else 0.0
    drop = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    return shuffle, max(drop, default=0.0)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_builds_its_model_with_the_registered_size_and_rates(name):
    cfg = compose_cfg("train", [f"model={name}", "data=fake"])
    model = _built(cfg)
    assert model.num_classes == cfg.data.num_classes and (cfg.model.name == name or name == "shufflemamba_demo")
    if name in SIZE_TABLES:  # null rates in the YAML: the size table (their one home) applies
        size = SIZE_TABLES[name]
        assert _rates(model) == pytest.approx((size.shuffle_rate, size.drop_path_rate))
    if name in VMAMBA_SIZES or name in MSVMAMBA_SIZES:
        size = VMAMBA_SIZES.get(name) or MSVMAMBA_SIZES[name]
        assert _rates(model)[1] == pytest.approx(size.drop_path_rate)
    if name.startswith(("vmamba", "msvmamba", "mambaout", "deit")):  # no token-shuffle key on the families without one
        assert "shuffle_rate" not in cfg.model


@pytest.mark.parametrize("name", ["vmamba_tiny", "mambaout_tiny", "deit_small_patch16_224"])
def test_a_token_shuffle_asked_of_a_family_without_it_is_a_config_error(name):
    cfg = compose_cfg("train", [f"model={name}", "data=fake", "+model.shuffle_rate=0.5"])
    with pytest.raises(UserError, match=rf"shuffle_rate=0.5.*not for {name}"):
        model_kwargs(cfg.model)
    cfg = compose_cfg("train", [f"model={name}", "data=fake", "+model.shuffle_rate=0"])
    assert "shuffle_rate" not in model_kwargs(cfg.model)[1]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_validates_and_builds_for_training_and_eval(experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}", "data.root=/data/imagenet"])
    validate(cfg)
    model = _built(cfg)
    assert model.num_classes == cfg.data.num_classes
    evaluation = compose_cfg("eval", [f"experiment={experiment}", "checkpoint=x.pt", "data.root=/x"])
    validate(evaluation)
    assert evaluation.eval.precision == cfg.trainer.precision  # a preset's precision reaches eval too
    if experiment != "demo":  # a published recipe holds on any number of GPUs: its global batch is fixed
        assert cfg.trainer.global_batch is not None
    if cfg.model.name in SIZE_TABLES and cfg.model.drop_path_rate is None:
        size = SIZE_TABLES[cfg.model.name]  # no preset repeats what the size table says
        assert _rates(model)[1] == pytest.approx(size.drop_path_rate)


def test_a_fine_tuning_preset_stops_without_its_source():
    cfg = compose_cfg("train", ["experiment=vim_tiny_stride8_ft", "data.root=/x"])
    assert cfg.checkpoint.finetune_required and cfg.checkpoint.finetune is None


@pytest.mark.parametrize(
    ("name", "crop"), [("vim_tiny_patch16_224", 0.875), ("shufflemamba_reg_base_patch16_224", 1.0),
                       ("mambaout_femto", 1.0), ("deit_tiny_patch16_224", 0.9)],
)  # fmt: skip
def test_data_settings_left_null_come_from_the_models_pretrained_cfg(name, crop):
    cfg = compose_cfg("train", [f"model={name}", "data=fake"])
    model = _built(cfg)
    resolve_input_settings(cfg.data, model)
    assert (cfg.data.crop_pct, cfg.data.interpolation) == (crop, model.pretrained_cfg["interpolation"])
    assert tuple(cfg.data.mean) == model.pretrained_cfg["mean"] and tuple(cfg.data.std) == model.pretrained_cfg["std"]
    cfg = compose_cfg("train", [f"model={name}", "data=fake", "data.crop_pct=0.5"])
    resolve_input_settings(cfg.data, model)
    assert cfg.data.crop_pct == 0.5  # what the config says wins
    deit = compose_cfg("train", ["experiment=deit_tiny_in1k", "data.root=/x"])
    assert deit.data.crop_pct == 0.875  # DeiT's recipe evaluates at its own crop, not timm's 0.9


def test_run_dir_stamp_is_shared_by_ranks_and_restarts(monkeypatch):
    from shufflemamba.config import run_stamp

    monkeypatch.delenv("SHUFFLEMAMBA_RUN_STAMP", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert run_stamp() == "torchrun-abc123"
    monkeypatch.setenv("SHUFFLEMAMBA_RUN_STAMP", "mine")
    assert run_stamp() == "mine"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sched.name=cosin", "sched.name='cosin' is not a valid choice; use one of: cosine, tanh, step"),
        ("trainer.precision=bf32", "trainer.precision='bf32' is not a valid choice; use one of: auto, bf16"),
        ("optim.name=adamww", "optim.name='adamww' is not a valid choice"),
        ("data.kind=imagenette", "data.kind='imagenette' is not a valid choice; use one of: imagenet, wds, hf"),
        ("model.scan_backend=trition", "model.scan_backend='trition' is not a valid choice; use one of: auto, cuda"),
        ("checkpoint.best_by=top5", "checkpoint.best_by='top5' is not a valid choice; use one of: ema, raw"),
        ("logger.mode=offlin", "logger.mode='offlin' is not a valid choice"),
        ("+sched.decay_epoch=30", "sched.decay_epoch is not a setting of timm's 'cosine' scheduler"),
    ],
)
def test_every_fixed_choice_is_checked_with_one_line(override, message):
    cfg = compose_cfg("train", ["experiment=demo", override])
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_help_and_a_mistyped_key_answer_before_torch_is_imported():
    """train.py parses its command line with Hydra alone: torch, timm and the models load after."""
    for args, expected in ((["--help"], 0), (["trainer.epochz=3"], 1)):
        proc = subprocess.run([sys.executable, "-X", "importtime", "train.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == expected, proc.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
        assert "torch" not in imported and "timm" not in imported, args
    assert "Could not override 'trainer.epochz'" in proc.stderr
