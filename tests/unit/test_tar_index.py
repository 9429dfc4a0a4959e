"""The tar index: bad shards are one line naming the shard and the member, at index time; a
shard that changed is re-indexed; counts are checked against _info.json."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from conftest import data_cfg

from shufflemamba.data.datasets import build_dataset
from shufflemamba.data.tar_index import ShardError
from shufflemamba.data.transforms import build_eval_transform
from shufflemamba.errors import UserError


@pytest.fixture
def shards(image_sets, tmp_path):
    """A private copy of the converted validation shards (48 samples: 40 + 8), to damage."""
    root = tmp_path / "wds"
    shutil.copytree(image_sets["wds"], root)
    return root


def _val(root, tmp_path, *overrides):
    data, _ = data_cfg("wds", root, tmp_path / "cache", *overrides)
    return build_dataset(data, "val", build_eval_transform(data))


def _rewrite(path, keep=lambda name: True, edit=lambda name, data: data):
    """Rewrite a shard's members through ``keep`` / ``edit``."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if keep(m.name):
                data = edit(m.name, data)
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_the_index_is_cached_and_each_sample_is_one_read(shards, tmp_path):
    ds = _val(shards, tmp_path)
    assert len(ds) == 48 and ds.index.shard_lengths().tolist() == [40, 8]
    assert ds.index.where(13) == "tiny-validation-00.tar:00000013.png"  # the PNG (c1's 2nd image) kept its format
    assert len(list((tmp_path / "cache").glob("wds-*.npz"))) == 1
    again = _val(shards, tmp_path)  # from the cache
    assert np.array_equal(again.index.offset, ds.index.offset)
    image, label = ds[3]
    assert image.shape == (3, 16, 16) and label == 0
    assert len(ds._fds) == 1  # one descriptor kept open for the shard read


def test_a_truncated_shard_names_the_shard_and_the_last_whole_member(shards, tmp_path):
    path = shards / "tiny-validation-00.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    os.truncate(path, members[30].offset_data + 10)  # inside a member's bytes
    with pytest.raises(ShardError, match=r"tiny-validation-00.tar: truncated or corrupt after member 00000009.json"):
        _val(shards, tmp_path)
    os.truncate(path, members[30].offset)  # exactly between two members: still no end-of-archive block
    with pytest.raises(ShardError, match="tiny-validation-00.tar: truncated or corrupt after member 00000009.json"):
        _val(shards, tmp_path)


def test_a_missing_shard_a_compressed_one_and_a_non_tar_are_named(shards, tmp_path):
    (shards / "tiny-validation-01.tar").unlink()
    with pytest.raises(ShardError, match=r"shard not found: .*tiny-validation-01.tar"):
        _val(shards, tmp_path)
    (shards / "tiny-validation-01.tar").write_bytes(b"\x1f\x8b\x08" + bytes(100))
    with pytest.raises(ShardError, match="tiny-validation-01.tar: compressed"):
        _val(shards, tmp_path)
    (shards / "tiny-validation-01.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ShardError, match="tiny-validation-01.tar: not a readable tar file"):
        _val(shards, tmp_path)


def test_a_member_without_its_label_or_with_a_bad_one_is_named(shards, tmp_path):
    path = shards / "tiny-validation-01.tar"
    original = path.read_bytes()
    _rewrite(path, keep=lambda name: name != "00000043.cls")
    with pytest.raises(ShardError, match=r"tiny-validation-01.tar: member 00000043.jpg has no label \(00000043.cls"):
        _val(shards, tmp_path)
    path.write_bytes(original)
    _rewrite(path, edit=lambda name, data: b"dog" if name == "00000044.cls" else data)
    with pytest.raises(ShardError, match="tiny-validation-01.tar: 00000044.cls holds b'dog', not a class index"):
        _val(shards, tmp_path)
    path.write_bytes(original)
    _rewrite(path, edit=lambda name, data: b"9" if name == "00000044.cls" else data)
    with pytest.raises(UserError, match="tiny-validation-01.tar:00000044.jpg has label 9, outside data.num_classes=4"):
        _val(shards, tmp_path)


def test_counts_that_disagree_with_info_json_stop_unless_allowed(shards, tmp_path, caplog):
    _rewrite(shards / "tiny-validation-01.tar", keep=lambda name: not name.startswith("00000047"))
    with pytest.raises(ShardError, match="tiny-validation-01.tar holds 7 samples, _info.json says 8 .and 1 more.; set"):
        _val(shards, tmp_path)
    ds = _val(shards, tmp_path, "data.allow_count_mismatch=true")
    assert len(ds) == 47 and "training on what is there" in caplog.text


def test_a_shard_changed_after_indexing_is_indexed_again(shards, tmp_path, caplog):
    assert _val(shards, tmp_path)[44][1] == 3
    path = shards / "tiny-validation-01.tar"
    _rewrite(path, edit=lambda name, data: b"2" if name == "00000044.cls" else data)
    os.utime(path, ns=(1, 1))  # a new mtime (and size): the cached offsets cannot be trusted
    ds = _val(shards, tmp_path)
    assert "changed since it was indexed" in caplog.text and ds[44][1] == 2


def test_undecodable_bytes_are_skipped_with_the_shard_member_and_cause(shards, tmp_path):
    _rewrite(
        shards / "tiny-validation-01.tar", edit=lambda name, data: b"\xff\xd8 junk" if name == "00000042.jpg" else data
    )
    ds = _val(shards, tmp_path)
    image, name = ds[(42, 0)]
    assert image is None and name.startswith("tiny-validation-01.tar:00000042.jpg (")


def test_shards_without_info_json_are_found_by_pattern(shards, tmp_path):
    info = json.loads((shards / "_info.json").read_text())
    (shards / "_info.json").unlink()
    ds = _val(shards, tmp_path)
    assert len(ds) == info["splits"]["validation"]["num_samples"]
    with pytest.raises(UserError, match=r"no shards match .*/\*-nothing-\*.tar"):
        _val(shards, tmp_path, "data.val_shards=*-nothing-*.tar")


def test_an_info_json_without_the_split_says_which_it_has(shards, tmp_path):
    with pytest.raises(UserError, match="has no split 'val' .it has: train, validation."):
        _val(shards, tmp_path, "data.val_split=val")
