"""shufflemamba.engine: schedules built from the config, the declared training state, builders."""

import pytest
import torch
from conftest import compose_cfg, tiny_vim
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from shufflemamba.checkpoint import TrainingState
from shufflemamba.data.samplers import ResumableTrainSampler
from shufflemamba.engine.batching import plan_batches
from shufflemamba.engine.builders import build_model, build_optimizer, build_scheduler
from shufflemamba.engine.trainer import RunProgress
from shufflemamba.errors import CheckpointError, UserError


def _lrs(scheduler, optimizer, updates):
    out = []
    for step in range(updates):
        scheduler.step_update(num_updates=step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def _optimizer(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_from_the_config_is_timms_cosine_stepped_per_update():
    sched_cfg = OmegaConf.create({"name": "cosine", "warmup_epochs": 2, "warmup_lr": 1e-6, "min_lr": 1e-5})
    opt_a, opt_b = _optimizer(), _optimizer()
    ours = build_scheduler(sched_cfg, opt_a, epochs=10, updates_per_epoch=7)
    reference = CosineLRScheduler(opt_b, t_initial=70, lr_min=1e-5, warmup_t=14, warmup_lr_init=1e-6, t_in_epochs=False)
    assert _lrs(ours, opt_a, 80) == _lrs(reference, opt_b, 80)


def test_step_schedule_decays_every_decay_epochs_after_warmup():
    sched_cfg = compose_cfg("train", ["sched=step", "sched.warmup_epochs=1", "sched.decay_epochs=3"]).sched
    optimizer = _optimizer(0.1)
    lrs = _lrs(build_scheduler(sched_cfg, optimizer, epochs=9, updates_per_epoch=4), optimizer, 36)
    assert isinstance(build_scheduler(sched_cfg, _optimizer(), 9, 4), StepLRScheduler)
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] < lrs[2] < lrs[3] < 0.1  # linear warmup over 4 updates
    assert lrs[4:12] == pytest.approx([0.1] * 8)  # updates 4..11: before the first decay at 12
    assert lrs[12:24] == pytest.approx([0.01] * 12) and lrs[24:] == pytest.approx([0.001] * 12)


def test_training_state_saves_and_restores_every_declared_component(tmp_path):
    model, progress = (
        tiny_vim(),
        RunProgress(epoch=3, sample_in_epoch=160, global_step=40, global_batch=32, best_top1=12.5),
    )
    optimizer = build_optimizer(compose_cfg("train", []).optim, model, lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = TrainingState({"model": model, "optimizer": optimizer, "progress": progress})
    state.save([tmp_path / "last.pt"], best_weights="raw", config={"a": 1})

    fresh_model, fresh_progress = tiny_vim(), RunProgress()
    fresh_optimizer = build_optimizer(compose_cfg("train", []).optim, fresh_model, lr=1e-3)
    fresh = TrainingState({"model": fresh_model, "optimizer": fresh_optimizer, "progress": fresh_progress})
    whole = fresh.load(tmp_path / "last.pt")
    assert fresh_progress == progress and whole["best_weights"] == "raw" and whole["config"] == {"a": 1}
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert str(fresh_optimizer.state_dict()) == str(optimizer.state_dict())

    with_ema = TrainingState({"model": tiny_vim(), "model_ema": tiny_vim(), "progress": RunProgress()})
    with pytest.raises(CheckpointError, match=r"no \['model_ema'\]"):  # never half-resumed
        with_ema.load(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="would overwrite"):
        state.state_dict(model={})


def test_a_dataset_smaller_than_one_batch_is_a_user_error_with_the_fix():
    with pytest.raises(UserError, match=r"14 training images cannot fill one global batch of 64 \(32 per micro"):
        ResumableTrainSampler(14, 32, world_size=2)


def _trainer_cfg(**kw):
    return OmegaConf.create({"grad_accum_steps": 1, "global_batch": None, **kw})


def test_accumulation_is_derived_from_the_global_batch():
    assert plan_batches(_trainer_cfg(global_batch=2048), micro_batch=64, world_size=2).accum_steps == 16
    assert plan_batches(_trainer_cfg(global_batch=2048), micro_batch=256, world_size=8).accum_steps == 1
    assert plan_batches(_trainer_cfg(grad_accum_steps=3), micro_batch=8, world_size=1).global_batch == 24
    assert plan_batches(_trainer_cfg(global_batch=64, grad_accum_steps=4), 16, 1).accum_steps == 4  # agreeing is fine


@pytest.mark.parametrize(
    ("kw", "micro", "world", "message"),
    [
        (
            {"global_batch": 2048},
            96,
            2,
            "not a whole number of micro-batches of data.batch_size=96 x 2 rank(s); "
            "nearest valid data.batch_size: 64 or 128",
        ),
        ({"global_batch": 100}, 16, 3, "nearest valid data.batch_size: none (it does not split over 3 ranks)"),
        ({"global_batch": 64, "grad_accum_steps": 2}, 16, 1, "trainer.grad_accum_steps=2 contradicts"),
        ({"grad_accum_steps": 0}, 16, 1, "trainer.grad_accum_steps must be >= 1"),
    ],
)
def test_impossible_batch_settings_are_one_line(kw, micro, world, message):
    with pytest.raises(UserError) as err:
        plan_batches(_trainer_cfg(**kw), micro, world)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("vim_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3)),
        ("shufflemamba_reg_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_cls_tokens=4)),
        ("vmamba_tiny", dict(dims=8, depths=(1, 2, 1, 1))),
        ("mambaout_femto", dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1))),
        ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)),
    ],
)
def test_layer_decay_gives_every_family_a_depth_wise_lr(name, kw):
    """optim.layer_decay through each model's group_matcher: the head at scale 1, the stem lowest."""
    import timm

    model = timm.create_model(name, num_classes=5, **kw)
    optim_cfg = compose_cfg("train", ["optim.layer_decay=0.75"]).optim
    optimizer = build_optimizer(optim_cfg, model, lr=1e-3)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    head = model.get_classifier().weight
    head_scale = next(g["lr_scale"] for g in optimizer.param_groups if any(p is head for p in g["params"]))
    assert len(scales) >= 4 and head_scale == max(scales) == 1.0 and min(scales) < 0.75**3


def test_a_backend_that_cannot_run_on_the_device_stops_the_build_with_one_line(monkeypatch):
    """Decided when the model is built (not at the first forward): triton on CPU tensors without the
    interpreter, mamba-ssm without a GPU; the line says what to do."""
    cfg = compose_cfg("train", ["experiment=demo", "model.depth=1", "model.embed_dim=16", "model.scan_backend=triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="scan backend 'triton' got CPU tensors: move the model to a CUDA GPU"):
        build_model(cfg, torch.device("cpu"))
    if not torch.cuda.is_available():
        cfg.model.scan_backend = "cuda"
        with pytest.raises(UserError, match="scan backend 'cuda' needs a CUDA GPU"):
            build_model(cfg, torch.device("cpu"))
