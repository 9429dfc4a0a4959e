"""LayerShuffle: every block runs once per forward in one permuted order per batch, sequential at
inference unless asked, `position` starts equal to `plain`, `predict` adds a finite loss, the
blocks keep their names, eval scores random block order, and a run resumes bitwise."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from conftest import TINY, compose_cfg, read_metrics, tiny_vim

from shufflemamba.engine.evaluator import evaluate
from shufflemamba.engine.trainer import Trainer, run_training
from shufflemamba.errors import StopRequested, UserError
from shufflemamba.models.layer_shuffle import layer_order_loss, with_layer_shuffle

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _deit(**kw):
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4,
                             num_heads=2, num_classes=7, **kw)  # fmt: skip


def _vim():
    return tiny_vim("shufflemamba_tiny_patch16_224", depth=4, shuffle_rate=0.5)


def _blocks(model):
    return list(model.layers) if hasattr(model, "layers") else list(model.blocks)


def _execution_order(model, x=X) -> list[int]:
    """The blocks in the order one forward ran them (forward hooks)."""
    ran = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(_blocks(model))]
    model(x)
    for h in handles:
        h.remove()
    return ran


@pytest.mark.parametrize("make", [_vim, _deit], ids=["shufflemamba", "deit"])
def test_each_block_runs_once_per_forward_in_a_permuted_order_and_sequentially_in_eval(make):
    model = with_layer_shuffle(make(), "plain").train()
    orders = [_execution_order(model) for _ in range(6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # each block exactly once: one order per forward
    assert len({tuple(o) for o in orders}) > 1  # a new order for the next batch
    model.eval()
    assert _execution_order(model) == [0, 1, 2, 3]
    model.layer_shuffle.random_order = True  # eval.layer_order=random
    assert len({tuple(_execution_order(model)) for _ in range(6)}) > 1


@pytest.mark.parametrize("make", [_vim, _deit], ids=["shufflemamba", "deit"])
def test_position_starts_equal_to_plain_and_predict_adds_a_finite_loss(make):
    torch.manual_seed(0)
    plain = with_layer_shuffle(make(), "plain").train()
    position = with_layer_shuffle(make(), "position").train()
    position.load_state_dict({**position.state_dict(), **plain.state_dict()})  # same block weights
    torch.manual_seed(1)
    a = plain(X)
    torch.manual_seed(1)  # the same draws: the same order (and token shuffles)
    b = position(X)
    assert torch.equal(a, b)
    assert any(k.startswith("layer_shuffle.slot_embed") for k in position.state_dict())
    assert not any(k.startswith("layer_shuffle") for k in plain.state_dict())  # plain owns no weights
    predict = with_layer_shuffle(make(), "predict").train()
    predict(X)
    aux = layer_order_loss(predict)
    assert aux is not None and torch.isfinite(aux) and aux > 0
    aux.backward()
    assert all(p.grad is not None for p in predict.layer_shuffle.parameters())
    predict.eval()
    predict(X)
    assert layer_order_loss(predict) is None  # unused at inference


def test_the_vit_keeps_its_state_dict_names_and_families_without_a_stack_are_refused():
    plain = _deit()
    shuffled = with_layer_shuffle(_deit(), "plain")
    assert list(shuffled.state_dict()) == list(plain.state_dict())  # official DeiT files load unchanged
    with pytest.raises(UserError, match="LayerShuffle reorders the blocks of the plain models"):
        with_layer_shuffle(timm.create_model("vmamba_tiny", dims=8, depths=(1, 1, 1, 1)), "plain")


def test_eval_scores_a_model_under_random_block_order_reproducibly():
    torch.manual_seed(0)
    model = with_layer_shuffle(_deit(), "none").eval()  # trained without LayerShuffle: still reorderable
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 7, (8,), generator=g), []) for _ in range(3)]

    def score(**kw):
        r = evaluate(model, batches, lambda x, y: (x, y), contextlib.nullcontext, torch.device("cpu"), **kw)
        return r["loss"]

    sequential = score()
    assert score(layer_order="random", seed=2) == score(layer_order="random", seed=2) != sequential
    assert score() == sequential  # the random order is switched off again afterwards


LAYERED = [*TINY, "model.depth=3", "model.layer_shuffle=predict", "trainer.epochs=2", "trainer.deterministic=true"]


def test_a_layershuffle_run_logs_its_loss_apart_and_resumes_bitwise(tmp_path, monkeypatch):
    run_training(compose_cfg("train", LAYERED), tmp_path / "reference")
    rows = [r for r in read_metrics(tmp_path / "reference") if r["split"] == "train"]
    assert rows and all(r["layer_order_loss"] > 0 for r in rows)
    update = Trainer.update

    def stop_at_update_3(self, *args):
        self.stop_requested = self.progress.global_step == 3
        return update(self, *args)

    monkeypatch.setattr(Trainer, "update", stop_at_update_3)
    with pytest.raises(StopRequested):
        run_training(compose_cfg("train", LAYERED), tmp_path / "stopped")
    monkeypatch.setattr(Trainer, "update", update)
    run_training(compose_cfg("train", LAYERED), tmp_path / "stopped")
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    with pytest.raises(UserError, match="trainer.compile with model.layer_shuffle"):
        Trainer(compose_cfg("train", [*LAYERED, "trainer.compile=true"]), tmp_path / "compiled")
