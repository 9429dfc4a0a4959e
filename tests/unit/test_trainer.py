"""The trainer and its checkpoint manager, in-process: bad input is one clear error before
training, a failed checkpoint write is one line that says what is intact, checkpoints are kept
as asked, signal handlers are given back, an empty micro-batch is skipped on any rank."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch
from conftest import TINY, compose_cfg, read_metrics, write_image_folder

from shufflemamba.engine.trainer import RunProgress, Trainer, run_training
from shufflemamba.errors import CheckpointError, StopRequested, UserError


def _train(tmp_path, *overrides, run="run"):
    return run_training(compose_cfg("train", [*TINY, *overrides]), tmp_path / run)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny demo run: its best.pt to fine-tune from."""
    run_dir = tmp_path_factory.mktemp("source")
    run_training(compose_cfg("train", [*TINY, "trainer.epochs=1", "trainer.max_steps_per_epoch=2"]), run_dir)
    return run_dir / "checkpoints" / "best.pt"


def test_bad_inputs_stop_before_training_with_one_line(tmp_path, source):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    small = write_image_folder(tmp_path / "small", {"train": 14, "val": 10}, num_classes=10)  # < one batch of 32
    cases = [
        (["data=imagenet"], "data.root is not set"),
        (["data=imagenet", f"data.root={tmp_path / 'nope'}"], f"dataset root not found: {tmp_path / 'nope'}"),
        (["data=imagenet", f"data.root={empty}"], f"no images found under {empty / 'train'}"),
        (["checkpoint.resume=/no/such.pt"], "checkpoint.resume: checkpoint not found: /no/such.pt"),
        (["trainer.precision=fp8"], "trainer.precision='fp8' is not a valid choice; use one of: auto, bf16"),
        (["sched.name=cosin", "data=imagenet", "data.root=/no/data"], "sched.name='cosin' is not a valid choice"),
        (["data=imagenet", f"data.root={small}", "data.num_classes=10", f"data.index_cache_dir={tmp_path}"],
         "14 training images cannot fill one global batch of 32"),
        (["checkpoint.finetune=/no/such.pt"], "checkpoint.finetune: checkpoint not found: /no/such.pt"),
        (["checkpoint.finetune_required=true"], "checkpoint.finetune is not set: this preset fine-tunes"),
        ([f"checkpoint.finetune={source}", "model.embed_dim=48"], "checkpoint does not match the model"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(UserError) as error:
            _train(tmp_path, *overrides)
        assert message in str(error.value), (overrides, str(error.value))
        assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained or written


def test_fit_gives_the_signal_handlers_back(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    _train(tmp_path, "trainer.epochs=1", "trainer.max_steps_per_epoch=1")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_progress_from_a_checkpoint_with_unknown_entries_is_refused():
    progress = RunProgress()
    with pytest.raises(CheckpointError, match=r"entries this version does not know: \['steps_left'\]"):
        progress.load_state_dict({**progress.state_dict(), "steps_left": 3})


def _train_on_a_folder_with_an_undecodable_image(root, run_dir, rank=0, world=1):
    """Batch 1 per rank: the broken image leaves its rank a micro-batch with nothing in it."""
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")  # fmt: skip
    cfg = compose_cfg("train", [*TINY, "data=imagenet", f"data.root={root}", "data.num_classes=4",
                                f"data.index_cache_dir={root / 'cache'}", "data.batch_size=1", "data.num_workers=0",
                                "trainer.epochs=1", "trainer.max_steps_per_epoch=null"])  # fmt: skip
    run_training(cfg, run_dir)


@pytest.mark.slow
def test_a_micro_batch_left_empty_by_undecodable_images_is_skipped_on_one_rank_or_two(tmp_path):
    root = write_image_folder(tmp_path / "images", {"train": 12, "val": 4})
    (root / "train" / "c1" / "img_0001.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    _train_on_a_folder_with_an_undecodable_image(root, tmp_path / "one")
    rows = read_metrics(tmp_path / "one")
    assert max(r["step"] for r in rows if r["split"] == "train") == 12  # every update counted, one skipped
    assert {(r["skipped_images"], r["skipped_batches"]) for r in rows if r["split"] == "val"} == {(1, 1)}
    # two gloo ranks: only one of them meets the empty micro-batch; neither may wait for the other forever
    spawn = multiprocessing.get_context("spawn")  # a forked child of a process that ran torch ops can hang in OpenMP
    ranks = [spawn.Process(target=_train_on_a_folder_with_an_undecodable_image, args=(root, tmp_path / "two", r, 2))
             for r in range(2)]  # fmt: skip
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=180)
    assert [p.exitcode for p in ranks] == [0, 0]
    rows = read_metrics(tmp_path / "two")
    assert max(r["step"] for r in rows if r["split"] == "train") == 6
    assert {(r["skipped_images"], r["skipped_batches"]) for r in rows if r["split"] == "val"} == {(1, 1)}


# Demo-sized overrides per family: the comparison families through the same trainer and eval.
FAMILIES = {
    "vmamba": ["model=vmamba_tiny", "model.dims=16", "model.depths=[1,1,2,1]"],
    "mambaout": ["model=mambaout_femto", "model.dims=[16,24,32,48]", "model.depths=[1,1,2,1]"],
    "msvmamba": ["model=msvmamba_nano", "model.dims=16", "model.depths=[1,1,2,1]"],
    "deit": ["model=deit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
             "model.num_heads=2"],
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_in_the_demo_setting_and_eval_reproduces_it(family, tmp_path):
    from shufflemamba.engine.evaluator import run_eval

    run_dir = tmp_path / "run"
    run_training(compose_cfg("train", ["experiment=demo", "data.batch_size=32", "trainer.epochs=2",
                                       "trainer.max_steps_per_epoch=3", *FAMILIES[family]]), run_dir)  # fmt: skip
    rows = read_metrics(run_dir)
    assert all(r["loss"] == r["loss"] for r in rows if r["split"] == "train")  # finite
    val = [r for r in rows if r["split"] == "val"]
    assert {r["epoch"] for r in val} == {0, 1} and all(r["num_images"] == 360 for r in val)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["config"]["model"]["name"] == FAMILIES[family][0].split("=")[1]
    command_line = ["experiment=demo", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}"]
    result = run_eval(compose_cfg("eval", command_line), command_line=command_line)
    assert result["top1"] == best["progress"]["best_top1"] and result["num_images"] == 360


def test_a_stop_file_stops_every_rank_after_a_checkpoint_and_exits_0(tmp_path, monkeypatch):
    """The SLURM script's pre-emption path (trainer.stop_file): the file appears, the run writes
    last.pt, removes the file (its answer) and stops with exit code 0 (torchrun must not restart)."""
    stop_file = tmp_path / "stop-requested"
    update = Trainer.update

    def request_at_update_2(self, *args):
        if self.progress.global_step == 2:
            stop_file.touch()
            self.stop_file.next_check = 0.0  # rank 0 looks at once (it checks at most once a second)
        return update(self, *args)

    monkeypatch.setattr(Trainer, "update", request_at_update_2)
    with pytest.raises(StopRequested, match=r"stop requested \(stop file\): checkpoint written at epoch 0") as stop:
        _train(tmp_path, f"trainer.stop_file={stop_file}")
    assert stop.value.exit_code == 0 and not stop_file.exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["progress"]["global_step"] == 3
