"""Configs: every preset and model config composes, choices are checked, model kwargs."""

import pytest
import timm
import torch
from conftest import ROOT, compose_cfg

from shufflemamba.config import model_kwargs, validate
from shufflemamba.errors import UserError
from shufflemamba.models import VIM_SIZES, VMAMBA_SIZES

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
TIMM_PUBLISHED = {  # (params with 1000 classes, published rounding in millions)
    "mambaout_femto": (7_304_536, 7.3),
    "mambaout_tiny": (26_545_096, 26.5),
    "mambaout_small": (48_488_072, 48.5),
    "mambaout_base": (84_813_092, 84.8),
    "deit_tiny_patch16_224": (5_717_416, 5.7),
    "deit_small_patch16_224": (22_050_664, 22.1),
    "deit_base_patch16_224": (86_567_656, 86.6),
}


@pytest.mark.parametrize("name", sorted(TIMM_PUBLISHED))
def test_timm_families_build_from_their_configs_with_the_published_sizes(name):
    cfg = compose_cfg("train", [f"model={name}", "data=imagenet", "data.root=/x"])
    built, kwargs = model_kwargs(cfg.model)
    assert built == name and "shuffle_rate" not in kwargs and "crop_pct" not in kwargs
    with torch.device("meta"):
        model = timm.create_model(built, **kwargs)
    count, millions = TIMM_PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == count
    assert round(count / 1e6, 1) == millions
    # the published eval crop reaches the data pipeline: MambaOut 1.0, DeiT 0.875 (not timm's 0.9)
    assert cfg.data.crop_pct == (1.0 if name.startswith("mambaout") else 0.875)


@pytest.mark.parametrize("name", ["vmamba_tiny", "mambaout_tiny", "deit_small_patch16_224"])
def test_token_shuffle_on_a_family_without_it_is_a_config_error(name):
    cfg = compose_cfg("train", [f"model={name}", "data=fake", "model.shuffle_rate=0.5"])
    with pytest.raises(UserError, match=rf"shuffle_rate=0.5.*not for {name}"):
        model_kwargs(cfg.model)
    # and a shuffle at rate 0 (the configs' default) is simply not passed on
    cfg = compose_cfg("train", [f"model={name}", "data=fake", "+model.shuffle_per_sample=true"])
    assert {"shuffle_rate", "shuffle_per_sample"}.isdisjoint(model_kwargs(cfg.model)[1])
    # the sequence models keep it
    cfg = compose_cfg("train", ["model=shufflemamba_tiny_patch16_224", "data=fake", "model.shuffle_rate=0.5"])
    assert model_kwargs(cfg.model)[1]["shuffle_rate"] == 0.5


def _built_rates(cfg) -> tuple[float, float]:
    """(shuffle p_max, drop path of the last block) of the model a config builds."""
    name, kwargs = model_kwargs(cfg.model)
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    shuffle = model.shuffle.shuffle_rate if hasattr(model, "shuffle") else 0.0
    drop = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    return shuffle, max(drop, default=0.0)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_composes_for_training_and_eval(experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}", "data.root=/data/imagenet"])
    assert cfg.model.num_classes == cfg.data.num_classes
    ev = compose_cfg("eval", [f"experiment={experiment}", "checkpoint=x.pt", "data.root=/data/imagenet"])
    assert ev.model.name == cfg.model.name and ev.data.img_size == cfg.data.img_size
    assert ev.eval.precision == cfg.trainer.precision  # a preset's precision reaches eval too
    published_global_batch = {  # reference doc, section 4 (8 GPUs x per-GPU batch [x accumulation])
        "vim_tiny_in1k": 1024,
        "vim_small_in1k": 512,
        "shufflemamba_base_in1k": 2048,
        "vmamba_tiny_in1k": 1024,
        "mambaout_tiny_in1k": 4096,
        "deit_tiny_in1k": 1024,
        "vim_tiny_stride8_ft": 1024,
        "vim_small_stride8_ft": 1024,
        "shufflemamba_reg_base_in1k_stage1": 1024,
        "shufflemamba_reg_base_in1k_stage2": 1024,
        "shufflemamba_reg_base_in1k_stage3": 512,
        "finetune_in1k_384": 512,
    }
    assert cfg.trainer.global_batch == published_global_batch.get(experiment)  # the demo: null (one process)
    name = cfg.model.name
    if name in VIM_SIZES:  # our sizes: the registry's published rates apply, no preset repeats them
        assert (cfg.model.shuffle_rate, cfg.model.drop_path_rate) == (None, None) or experiment == "demo"
        if experiment != "demo":
            assert _built_rates(cfg) == pytest.approx((VIM_SIZES[name].shuffle_rate, VIM_SIZES[name].drop_path_rate))
    if name in VMAMBA_SIZES:
        assert cfg.model.drop_path_rate is None and _built_rates(cfg)[1] == pytest.approx(VMAMBA_SIZES[name][3])
    if experiment == "shufflemamba_base_in1k":  # the published recipe (reference doc, section 4)
        assert (cfg.trainer.clip_grad, list(cfg.optim.betas), cfg.sched.warmup_epochs) == (3.0, [0.9, 0.95], 30)
        assert cfg.data.batch_size == 256 and cfg.trainer.ema.decay == 0.9999 and cfg.trainer.precision == "bf16"
    if experiment == "vim_small_in1k":
        assert (cfg.data.batch_size, cfg.optim.base_lr) == (64, 1e-3)
    if experiment == "vmamba_tiny_in1k":
        assert (cfg.trainer.clip_grad, cfg.aug.repeated_aug, cfg.sched.warmup_epochs) == (5.0, 1, 20)
        assert (cfg.trainer.ema.decay, cfg.data.crop_pct) == (0.9999, 0.875)
    if experiment == "mambaout_tiny_in1k":
        global_batch = cfg.trainer.global_batch
        assert (global_batch, cfg.optim.base_lr * global_batch / 512) == (4096, 4e-3)  # lr 4e-3 at 4096
        assert _built_rates(cfg)[1] == pytest.approx(0.2)
        assert (cfg.trainer.ema.enabled, cfg.data.crop_pct) == (False, 1.0)
    if experiment == "deit_tiny_in1k":
        assert _built_rates(cfg)[1] == pytest.approx(0.1)
    if experiment.endswith("_ft") or experiment.startswith("finetune") or experiment.endswith(("stage2", "stage3")):
        assert cfg.finetune_required and cfg.finetune is None  # a fine-tuning recipe needs finetune=PATH
    if experiment.startswith("vim_") and experiment.endswith("stride8_ft"):  # reference doc, section 5
        assert cfg.model.name.endswith("stride8_224") and _built_rates(cfg) == (0.0, 0.0)
        assert (cfg.optim.base_lr * 1024 / 512, cfg.sched.min_lr, cfg.optim.weight_decay) == (1e-5, 1e-5, 1e-8)
        assert (cfg.trainer.epochs, cfg.trainer.precision) == (30, "fp32")
    if experiment.startswith("shufflemamba_reg_base_in1k_stage"):
        stage = int(experiment[-1])
        assert _built_rates(cfg)[0] == pytest.approx(0.1)  # shuffle 0.1 in every stage
        assert _built_rates(cfg)[1] == pytest.approx([0.1, 0.4, 0.4][stage - 1])
        assert cfg.data.img_size == [128, 224, 224][stage - 1] and cfg.trainer.epochs == [300, 100, 20][stage - 1]
        assert cfg.aug.auto_augment == ["3a", "3a", "rand-m9-mstd0.5-inc1"][stage - 1]
        assert (cfg.aug.reprob, cfg.aug.smoothing) == [(0.0, 0.0), (0.0, 0.0), (0.25, 0.1)][stage - 1]
        assert cfg.data.crop_pct == 1.0 and cfg.aug.repeated_aug == [3, 3, 1][stage - 1]


def test_model_configs_leave_the_registered_rates_to_the_registry():
    """Our families' YAMLs set no rate (null = the size table's); the CLI still overrides."""
    for name in [*VIM_SIZES, *VMAMBA_SIZES]:
        cfg = compose_cfg("train", [f"model={name}", "data=fake"])
        assert cfg.model.drop_path_rate is None and cfg.model.get("shuffle_rate") is None, name
    cfg = compose_cfg("train", ["model=vim_small_patch16_224", "data=fake", "model.drop_path_rate=0.3"])
    assert _built_rates(cfg)[1] == pytest.approx(0.3)


@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_every_model_config_composes_and_builds(model):
    cfg = compose_cfg("train", [f"model={model}", "data=fake"])
    name, kwargs = model_kwargs(cfg.model)
    assert name == model or model == "shufflemamba_demo"
    with torch.device("meta"):
        built = timm.create_model(name, **kwargs)
    assert built.num_classes == cfg.data.num_classes
    assert cfg.data.crop_pct == cfg.model.crop_pct


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
        ("data.kind=imagenette", "data.kind='imagenette' is not a valid choice; use one of: imagenet, wds, hf, imagenet_tar, demo, fake"),
        (
            "model.scan_backend=trition",
            "model.scan_backend='trition' is not a valid choice; use one of: auto, cuda, triton",
        ),
        ("logger.mode=offlin", "logger.mode='offlin' is not a valid choice"),
        ("+sched.decay_epoch=30", "sched.decay_epoch is not a setting of timm's 'cosine' scheduler"),
    ],
)
def test_every_fixed_choice_is_checked_with_one_line(override, message):
    cfg = compose_cfg("train", ["experiment=demo", override])
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shipped_configs_validate():
    for experiment in EXPERIMENTS:
        validate(compose_cfg("train", [f"experiment={experiment}", "data.root=/x"]))
        validate(compose_cfg("eval", [f"experiment={experiment}", "data.root=/x", "checkpoint=x"]))
    validate(compose_cfg("train", ["sched=step"]))
