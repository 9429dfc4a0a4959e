"""The shard converter (scripts/make_shards.py): a killed conversion continues to the bytes of an
uninterrupted one; the format is detected; what cannot be converted is one line."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal

import pytest
from conftest import ROOT, data_cfg

from shufflemamba.data.datasets import EncodedDataset, open_split
from shufflemamba.data.shard_writer import PLAN_FILE, convert, plan_split
from shufflemamba.errors import UserError


class _DiesAt(EncodedDataset):
    """The source, until it is asked for sample ``index``: then the process is SIGKILLed."""

    def __init__(self, source, index):
        self.source, self.index = source, index

    def __len__(self):
        return len(self.source)

    def encoded(self, i):
        if i == self.index:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.source.encoded(i)


def _convert(source, dst, per_shard=10, shuffle=None):
    convert({"train": source}, [plan_split("train", "src", len(source), "t", per_shard, shuffle)], dst)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(image_sets):
    return open_split(data_cfg("imagenet", image_sets["imagenet"], image_sets["cache"])[0], "train")


def test_a_killed_conversion_continues_to_the_same_bytes(source, tmp_path):
    _convert(source, tmp_path / "reference")
    killed = tmp_path / "killed"
    worker = multiprocessing.get_context("fork").Process(target=_convert, args=(_DiesAt(source, 75), killed))
    worker.start()
    worker.join()
    assert worker.exitcode == -signal.SIGKILL
    left = sorted(p.name for p in killed.iterdir())
    assert left == [PLAN_FILE] + [f"t-train-{i:02d}.tar" for i in range(7)] + ["t-train-07.tar.tmp"]
    _convert(source, killed)  # the same command again
    assert _files(killed) == _files(tmp_path / "reference")  # _info.json included; nothing else left behind
    with pytest.raises(UserError, match="already holds a finished set of shards"):
        _convert(source, killed)


def test_another_plan_into_an_unfinished_folder_is_refused(source, tmp_path):
    worker = multiprocessing.get_context("fork").Process(target=_convert, args=(_DiesAt(source, 30), tmp_path))
    worker.start()
    worker.join()
    with pytest.raises(UserError, match="holds an unfinished conversion with other settings"):
        _convert(source, tmp_path, per_shard=20)


def test_a_shuffled_conversion_keeps_every_sample_once(source, tmp_path):
    _convert(source, tmp_path, per_shard=50, shuffle=1)
    cfg, _ = data_cfg("wds", tmp_path, tmp_path / "cache", "data.train_split=train")
    shards = open_split(cfg, "train")
    copied = sorted(shards.encoded(i).data for i in range(len(shards)))
    assert copied == sorted(source.encoded(i).data for i in range(len(source)))
    assert [shards.encoded(i).data for i in range(5)] != [source.encoded(i).data for i in range(5)]


def _script():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_detects_each_format_and_says_what_is_wrong_in_one_line(image_sets, tmp_path, capsys):
    script = _script()
    assert script.detect_format(image_sets["imagenet"]) == "imagenet"
    assert script.detect_format(image_sets["wds"]) == "wds"
    assert script.detect_format(image_sets["hf"]) == "hf"
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path), str(tmp_path / "out")])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: cannot tell the format of {tmp_path}: pass --format imagenet|wds|hf|imagenet_tar\n"
    )
    script.main([str(image_sets["wds"]), str(tmp_path / "again"), "--splits", "val", "--samples-per-shard", "16",
                 f"data.index_cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "_info.json", "again-validation-00.tar", "again-validation-01.tar", "again-validation-02.tar"
    ]  # fmt: skip
