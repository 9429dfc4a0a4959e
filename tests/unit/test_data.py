"""Data: the DeiT transform on Pillow 13, samplers, the cached file index, undecodable images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, data_cfg
from omegaconf import OmegaConf
from PIL import Image
from timm.data import auto_augment

from shufflemamba.data.datasets import FolderDataset, ImageFolderIndex, build_dataset
from shufflemamba.data.loader import (
    DeviceBatchTransform,
    build_eval_loader,
    build_train_loader,
    collate_uint8,
    release_workers,
)
from shufflemamba.data.samplers import ResumableTrainSampler, ShardedEvalSampler
from shufflemamba.data.transforms import build_eval_transform, build_train_transform, posterize_safe
from shufflemamba.errors import UserError

DATA = OmegaConf.create(
    {"img_size": 64, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
)
DEIT = OmegaConf.load(ROOT / "conf" / "aug" / "deit.yaml")


def test_posterize_to_zero_bits_is_a_black_image_on_every_pillow():
    build_train_transform(DATA, DEIT)  # installs the fix, explicitly, as every loader build does
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(posterize_safe(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_safe(img, 4)), np.asarray(img) & 0xF0)
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is posterize_safe


def test_the_full_deit_transform_survives_thousands_of_images():
    """RandAugment m9 mstd0.5 reaches magnitude 10 (0 bits kept) ~0.16% of calls: a worker killer on Pillow 13."""
    transform = build_train_transform(DATA, DEIT)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48 + i, 40 + 2 * i, 3), dtype=np.uint8)) for i in range(8)]
    calls = {"zero_bits": 0}
    original = auto_augment.NAME_TO_OP["PosterizeIncreasing"]

    def counting(img, bits, **kw):
        calls["zero_bits"] += bits <= 0
        return original(img, bits, **kw)

    for op in transform.transforms:
        for aug in getattr(getattr(op, "ops", None) or [], "__iter__", lambda: [])():
            if aug.name == "PosterizeIncreasing":
                aug.aug_fn = counting
    for i in range(4000):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert calls["zero_bits"] > 0  # the crashing case was exercised


def test_eval_transform_resizes_then_centre_crops():
    out = build_eval_transform(DATA)(Image.new("RGB", (100, 80), (10, 20, 30)))
    assert out.shape == (3, 64, 64) and out[:, 0, 0].tolist() == [10, 20, 30]


def test_device_transform_normalises_erases_and_mixes():
    aug = OmegaConf.merge(DEIT, {"reprob": 1.0})
    t = DeviceBatchTransform(DATA, aug, torch.device("cpu"), num_classes=10)
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    x, y = t(images, torch.arange(4))
    assert x.dtype == torch.float32 and y.shape == (4, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    x_eval, y_eval = DeviceBatchTransform(DATA, None, torch.device("cpu"), 10)(images, torch.arange(4))
    assert torch.all(x_eval == 1.0) and torch.equal(y_eval, torch.arange(4))
    x_odd, y_odd = t(images[:3], torch.arange(3))  # odd batch after a skipped image: still mixes
    assert x_odd.shape[0] == 2 and y_odd.shape == (2, 10)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeated_augmentation_sampler_covers_copies_across_ranks(world):
    n, batch, repeats = 100, 4, 3
    samplers = [ResumableTrainSampler(n, batch, r, world, repeats=repeats, seed=1) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    steps = n // (batch * world)
    assert all(len(p) == steps * batch == len(s) for p, s in zip(per_rank, samplers, strict=True))
    indices = [i for p in per_rank for i, _ in p]
    counts = np.bincount(indices, minlength=n)
    assert counts.max() <= repeats and len(set(indices)) < len(indices)  # repeated copies
    seeds = [sd for p in per_rank for _, sd in p]
    assert len(set(seeds)) == len(seeds)  # each copy gets its own augmentation
    s = samplers[0]
    s.set_epoch(1)
    assert list(s) != per_rank[0]


def _steps(world: int, micro: int, accum: int, n: int = 120, epoch: int = 2, start: int = 0) -> list[list]:
    """Per optimizer step, the sorted (index, seed) pairs trained by all ranks together."""
    samplers = [ResumableTrainSampler(n, micro, r, world, accum_steps=accum, repeats=3, seed=7) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch, start)
    per_rank = [list(s) for s in samplers]
    per_step = micro * accum
    return [
        sorted(item for items in per_rank for item in items[k * per_step : (k + 1) * per_step])
        for k in range(len(per_rank[0]) // per_step)
    ]


def test_each_step_trains_the_same_samples_and_seeds_on_any_world_size_and_split():
    """Global batch 24: 1 rank x 24, 1 x 12 x 2 steps, 2 x 12, 2 x 6 x 2, 4 x 6, 4 x 3 x 2."""
    reference = _steps(world=1, micro=24, accum=1)
    assert len(reference) == 120 // 24 and all(len(step) == 24 for step in reference)
    for world, micro, accum in [(1, 12, 2), (2, 12, 1), (2, 6, 2), (4, 6, 1), (4, 3, 2)]:
        assert _steps(world, micro, accum) == reference, (world, micro, accum)
    # resuming at a sample position continues the same steps, on another world size too
    assert _steps(world=4, micro=3, accum=2, start=48) == reference[2:]


def test_micro_batch_offsets_tile_the_global_order_identically_across_splits():
    one = ResumableTrainSampler(64, 8, 0, 1, accum_steps=4)
    two = [ResumableTrainSampler(64, 8, r, 2, accum_steps=2) for r in range(2)]
    assert [one.micro_batch_offset(i) for i in range(4)] == [0, 8, 16, 24]
    assert sorted(s.micro_batch_offset(i) for s in two for i in range(2)) == [0, 8, 16, 24]
    assert two[1].micro_batch_offset(1) == 24 and one.micro_batch_offset(4) == 32  # next step


def test_train_sampler_resumes_mid_epoch_exactly():
    s = ResumableTrainSampler(64, 4, repeats=1, seed=3)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start_sample=24)
    assert list(s) == full[24:] and len(s) == len(full) - 24 and (s.updates_done, s.updates_left) == (6, 10)
    capped = ResumableTrainSampler(64, 4, repeats=1, seed=3, max_updates=8)  # trainer.max_steps_per_epoch
    capped.set_epoch(5, start_sample=24)
    assert (capped.updates_per_epoch, capped.updates_left) == (8, 2) and list(capped) == full[24:32]


@pytest.mark.parametrize("n,world", [(10, 3), (360, 2), (7, 8), (1, 1)])
def test_eval_shards_count_every_image_exactly_once(n, world):
    shards = [list(ShardedEvalSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))


def _folder(tmp_path, n_per_class=3):
    for c in ("b", "a"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / c / f"{i}.png")
    return tmp_path


def test_file_index_is_cached_in_arrays_and_refreshable(tmp_path):
    root = _folder(tmp_path / "train")
    cache = tmp_path / "cache"
    index = ImageFolderIndex.load_or_scan(root, cache)
    assert index.classes == ["a", "b"] and isinstance(index.rel_paths, np.ndarray)
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1]
    Image.new("RGB", (10, 10)).save(root / "a" / "new.png")
    assert len(ImageFolderIndex.load_or_scan(root, cache)) == 6  # read from the cache
    assert len(ImageFolderIndex.load_or_scan(root, cache, refresh=True)) == 7


def test_undecodable_images_are_skipped_and_named_with_the_cause(tmp_path):
    root = _folder(tmp_path / "train")
    (root / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    Image.new("CMYK", (10, 10)).save(root / "b" / "cmyk.jpg")
    ds = FolderDataset(ImageFolderIndex.scan(root), transform=build_eval_transform(DATA))
    items = [ds[(i, 7)] for i in range(len(ds))]
    images, labels, failed = collate_uint8(items)
    assert len(failed) == 1 and failed[0].startswith(f"{root / 'a' / 'bad.png'} (UnidentifiedImageError")
    assert images.shape == (7, 3, 64, 64) and labels.shape == (7,)


def test_missing_or_empty_roots_are_user_errors(tmp_path):
    cfg = OmegaConf.create(
        {"kind": "imagenet", "root": str(tmp_path / "none"), "num_classes": 2, "train_split": "train"}
    )
    with pytest.raises(UserError, match="dataset root not found"):
        build_dataset(cfg, "train", None)
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found under"):
        build_dataset(cfg, "train", None)
    with pytest.raises(UserError, match="data.root is not set"):
        build_dataset(OmegaConf.create({"kind": "imagenet", "root": "???"}), "train", None)


def test_release_workers_stops_persistent_workers_and_the_loader_still_works():
    """The exit fix for pytorch#81794: the workers must be gone after release, not left for atexit."""
    cfg = OmegaConf.merge(
        DATA,
        {"kind": "fake", "img_size": 16, "num_val": 8, "num_classes": 4, "num_workers": 2, "pin_memory": False},
    )
    loader = build_eval_loader(build_dataset(cfg, "val", build_eval_transform(cfg)), cfg, 0, 1, batch_size=4)
    first = torch.cat([labels for _, labels, _ in loader])
    workers = list(loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)  # persistent: alive between epochs
    release_workers(loader)
    assert not any(w.is_alive() for w in workers) and loader._iterator is None
    assert torch.equal(torch.cat([labels for _, labels, _ in loader]), first)  # a later epoch starts new workers
    release_workers(loader)


def test_demo_digits_split_is_fixed_and_stratified():
    train = build_dataset(OmegaConf.create({"kind": "demo", "img_size": 16}), "train", None)
    val = build_dataset(OmegaConf.create({"kind": "demo", "img_size": 16}), "val", None)
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.labels).min() >= 35
    img, label = val[0]
    assert img.size == (16, 16) and 0 <= label < 10


def test_three_augment_is_timms_3a_policy_with_colour_jitter_and_is_seeded_per_sample(tmp_path):
    cfg = OmegaConf.load(ROOT / "conf" / "aug" / "three_augment.yaml")
    transform = build_train_transform(DATA, cfg)
    names = [type(t).__name__ for t in transform.transforms]
    assert "AutoAugment" in names and "ColorJitter" in names and "RandAugment" not in names
    assert names.index("AutoAugment") < names.index("ColorJitter")  # one of three, then jitter
    root = tmp_path / "train" / "a"
    root.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "0.png")
    ds = FolderDataset(ImageFolderIndex.scan(tmp_path / "train"), transform=transform)
    a, b, c = ds[(0, 123)][0], ds[(0, 123)][0], ds[(0, 124)][0]
    assert torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))  # the seed decides
    assert not torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(c)))


# ---- every stored format gives the same samples -------------------------------------------

FORMATS = ("imagenet", "wds", "hf", "imagenet_tar")


def _as_ilsvrc_tars(folder, root):
    """The ImageFolder as ILSVRC2012's tars: a tar of per-class tars, a flat validation tar and
    a ``<file> <wnid>`` label file."""
    import io
    import tarfile

    root.mkdir()
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c in sorted(p.name for p in (folder / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for f in sorted((folder / "train" / c).iterdir()):
                    tar.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{c}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)
    lines = []
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for f in sorted((folder / "val").glob("*/*"), key=lambda p: p.name):  # not in class order
            tar.add(f, arcname=f.name)
            lines.append(f"{f.name} {f.parent.name}")
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def format_roots(image_sets):
    roots = dict(image_sets)
    roots["imagenet_tar"] = _as_ilsvrc_tars(image_sets["imagenet"], image_sets["base"] / "ilsvrc")
    return roots


def _dataset(kind, roots, split, transform_of=build_train_transform):
    extra = ["data.val_labels=val_labels.txt"] if kind == "imagenet_tar" else []
    data, aug = data_cfg(kind, roots[kind], roots["cache"], *extra)
    transform = transform_of(data, aug) if transform_of is build_train_transform else transform_of(data)
    return build_dataset(data, split, transform)


def test_every_format_gives_bitwise_the_same_augmented_samples(format_roots):
    """For a (seed, epoch, position) of the sampler, the DeiT-augmented uint8 tensor and the label
    are the same read from an ImageFolder, tar shards, parquet or the ILSVRC tars."""
    sets = {kind: _dataset(kind, format_roots, "train") for kind in FORMATS}
    assert {len(s) for s in sets.values()} == {192}
    sampler = ResumableTrainSampler(192, 16, repeats=3, seed=5)
    sampler.set_epoch(2)
    picks = list(sampler)[:48]
    reference = [sets["imagenet"][item] for item in picks]
    for kind in FORMATS[1:]:
        for (index, seed), (image, label) in zip(picks, reference, strict=True):
            other_image, other_label = sets[kind][(index, seed)]
            assert other_label == label and torch.equal(other_image, image), (kind, index)


def test_every_format_gives_the_same_validation_samples(format_roots):
    folder = _dataset("imagenet", format_roots, "val", build_eval_transform)
    for kind in FORMATS[1:]:
        other = _dataset(kind, format_roots, "val", build_eval_transform)
        order = range(len(folder))  # the converter and the parquet files keep the folder's order
        if kind == "imagenet_tar":  # the validation tar is in file-name order: match by name
            position = {name.decode(): i for i, name in enumerate(other.index.name)}
            order = [position[p.decode().rsplit("/", 1)[-1]] for p in folder.index.rel_paths]
        assert len(other) == len(folder) == 48
        for i, j in enumerate(order):
            (image, label), (other_image, other_label) = folder[i], other[j]
            assert other_label == label and torch.equal(other_image, image), (kind, i)


def test_shards_feed_each_step_the_same_images_on_one_or_two_ranks(format_roots):
    """Real loader workers reading shards: micro-batch m of step k is the same images whether one
    rank accumulates two micro-batches or two ranks take one each."""
    dataset = _dataset("wds", format_roots, "train")
    data, aug = data_cfg("wds", format_roots["wds"], format_roots["cache"], "data.batch_size=8", "data.num_workers=2")

    def batches(rank, world, accum):
        loader, sampler = build_train_loader(dataset, data, aug, rank, world, accum, seed=3)
        sampler.set_epoch(1)
        out = [(images, labels) for images, labels, _ in loader]
        release_workers(loader)
        return out

    one = batches(0, 1, accum=2)
    two = [batches(r, 2, accum=1) for r in range(2)]
    assert len(one) == 2 * len(two[0]) == 24
    for i, (images, labels) in enumerate(one):
        other_images, other_labels = two[i % 2][i // 2]
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_without_repeats_trains_every_sample_at_most_once(world):
    samplers = [ResumableTrainSampler(100, 4, r, world, repeats=1, seed=2) for r in range(world)]
    indices = [i for s in samplers for i, _ in s]
    assert len(indices) == len(set(indices)) == 100 // (4 * world) * 4 * world
