"""data=hf: a save_to_disk folder reads like the parquet files it came from; missing columns,
splits and the missing package are one line each."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import data_cfg

from shufflemamba.data.datasets import build_dataset
from shufflemamba.data.transforms import build_eval_transform
from shufflemamba.errors import UserError


def _val(root, cache, *overrides):
    data, _ = data_cfg("hf", root, cache, *overrides)
    return build_dataset(data, "val", build_eval_transform(data))


def test_a_save_to_disk_folder_reads_like_the_parquet_files(image_sets, tmp_path):
    datasets = pytest.importorskip("datasets")
    parquet = _val(image_sets["hf"], tmp_path)
    files = sorted(str(p) for p in (image_sets["hf"] / "data").glob("*.parquet"))
    splits = datasets.load_dataset("parquet", data_files={
        "train": [f for f in files if "/train-" in f], "validation": [f for f in files if "/validation-" in f]
    }, cache_dir=str(tmp_path / "hf"))  # fmt: skip
    splits.save_to_disk(str(tmp_path / "saved"))
    saved = _val(tmp_path / "saved", tmp_path)
    assert len(saved) == len(parquet) == 48
    for i in (0, 13, 47):  # 13: the PNG
        (a, label_a), (b, label_b) = parquet[i], saved[i]
        assert label_a == label_b and torch.equal(a, b)
    assert saved.encoded(13).ext == "png" and saved.encoded(13).name.endswith("(img_0005.png)")


def test_missing_columns_splits_and_files_are_one_line(image_sets, tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match="has no column 'jpg' .columns: image, label.; set data.image_column"):
        _val(image_sets["hf"], tmp_path, "data.image_column=jpg")
    with pytest.raises(UserError, match=r"no parquet files of split 'valid' under .* \(looked for \*\*/valid-"):
        _val(image_sets["hf"], tmp_path, "data.val_split=valid")


def test_without_the_datasets_package_the_error_says_how_to_install_it(image_sets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r"data=hf needs Hugging Face's datasets package: pip install -e '.\[hf\]'"):
        _val(image_sets["hf"], tmp_path)
