"""Turn an ImageFolder (or shards, ILSVRC2012 tars, Hugging Face files) into tar shards in timm's
layout, once, so training reads a few thousand large files instead of 1.28M small ones.

    python scripts/make_shards.py /data/imagenet /data/imagenet-wds --prefix imagenet1k --workers 16
    python train.py experiment=vim_tiny_in1k data=wds data.root=/data/imagenet-wds

Writes ``<prefix>-train-NNNN.tar`` and ``<prefix>-validation-NN.tar`` (``--samples-per-shard``
samples each; the original image bytes, never re-encoded, + ``.cls`` + ``.json``) and
``_info.json``. Killed, it continues: run the same command again. The source format is
detected (``--format`` to say it); settings of the source's data config go after the options,
as on train.py's command line (``data.val_labels=val.txt``). Samples keep the source's order
(our sampler shuffles); ``--shuffle SEED`` mixes them for readers that stream shards in order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from shufflemamba.config import register_resolvers
from shufflemamba.data.datasets import open_split
from shufflemamba.data.shard_writer import convert, plan_split
from shufflemamba.data.tar_index import INFO_FILE
from shufflemamba.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
OUTPUT_SPLITS = {"train": "train", "val": "validation"}  # our split -> the name timm's layout gives it


def detect_format(src: Path) -> str:
    """The ``data=`` kind of a folder, from what it holds."""
    if (src / "ILSVRC2012_img_train.tar").is_file():
        return "imagenet_tar"
    if (src / INFO_FILE).is_file() or any(src.glob("*.tar")):
        return "wds"
    if (src / "dataset_dict.json").is_file() or any(src.glob("**/*.parquet")):
        return "hf"
    if any((src / s).is_dir() for s in ("train", "val")):
        return "imagenet"
    raise UserError(f"cannot tell the format of {src}: pass --format imagenet|wds|hf|imagenet_tar")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("overrides", nargs="*", help="settings of the source's data config, e.g. data.val_split=val")
    parser.add_argument("--format", default="auto", choices=["auto", "imagenet", "wds", "hf", "imagenet_tar"])
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--prefix", default=None, help="shard file prefix (default: the destination folder's name)")
    parser.add_argument("--samples-per-shard", type=int, default=1250)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="mix the order (default: keep it)")
    args = parser.parse_intermixed_args(argv)
    try:
        src = args.src.expanduser().resolve()
        if not src.is_dir():
            raise UserError(f"source folder not found: {src}")
        kind = detect_format(src) if args.format == "auto" else args.format
        register_resolvers()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"data={kind}", f"data.root={src}", *args.overrides])
        prefix = args.prefix or args.dst.resolve().name
        sources, plans = {}, []
        for split in args.splits:
            dataset = open_split(cfg.data, split)
            name = OUTPUT_SPLITS[split]
            sources[name] = dataset
            plans.append(plan_split(name, f"{kind}:{src}:{split}", len(dataset), prefix, args.samples_per_shard,
                                    args.shuffle))  # fmt: skip
            print(f"{split}: {len(dataset)} samples from {kind} {src} -> {len(plans[-1].filenames)} shards")
        splits = convert(sources, plans, args.dst.expanduser(), workers=args.workers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for name, entry in splits.items():
        print(f"{name}: {entry['num_samples']} samples in {len(entry['filenames'])} shards")
    print(f"wrote {args.dst / INFO_FILE}; train with: data=wds data.root={args.dst}")


if __name__ == "__main__":
    main()
