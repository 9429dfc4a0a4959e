"""Copy the weights out of a checkpoint that the safe loader refuses into a file of tensors only.

Official VMamba release files, for example, pickle their yacs training config next to the
weights; ``torch.load(weights_only=True)`` (what train.py / eval.py use) rightly refuses them,
and plain unpickling needs yacs installed. This script unpickles the file once, replacing
every class whose module is not installed by an inert placeholder, and writes
``{"model": ..., "model_ema": ...}`` (tensors only) that everything here loads safely.

ONLY FOR FILES YOU TRUST: classes that are installed are imported and built as pickle
normally would, which can run code.

    python scripts/extract_weights.py vssm1_tiny_0230s_ckpt_epoch_264.pth vmamba_tiny_in1k.pth
    python eval.py model=vmamba_tiny checkpoint=vmamba_tiny_in1k.pth data.root=/data/imagenet
"""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHT_KEYS = ("model", "model_ema", "state_dict")


class _Placeholder(dict):
    """Stands in for a class that is not installed (e.g. ``yacs.config.CfgNode``): accepts any
    constructor arguments, items and state, and keeps them inert."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def append(self, item) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items) -> None:
        self.__dict__.setdefault("_items", []).extend(items)


class _PlaceholderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            print(f"  placeholder for {module}.{name} (not installed)", file=sys.stderr)
            return type(name, (_Placeholder,), {"__module__": f"missing.{module}"})


def _pickle_module() -> types.ModuleType:
    """A pickle-like module for torch.load(pickle_module=...) whose Unpickler uses placeholders."""
    module = types.ModuleType("placeholder_pickle")
    module.Unpickler = _PlaceholderUnpickler
    module.load = lambda f, **kw: _PlaceholderUnpickler(f, **kw).load()
    return module


def _tensors_only(state: Mapping) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(out) != len(state):
        dropped = sorted(set(state) - set(out))
        print(f"  dropped {len(dropped)} non-tensor entries: {dropped[:5]}", file=sys.stderr)
    return out


def extract(src: Path, dst: Path) -> dict[str, int]:
    """Write the tensors of ``src``'s weight entries to ``dst``; returns {entry: tensor count}."""
    obj = torch.load(src, map_location="cpu", weights_only=False, pickle_module=_pickle_module())
    if not isinstance(obj, Mapping):
        raise SystemExit(f"{src} holds a {type(obj).__name__}, not a checkpoint dict")
    found = {k: obj[k] for k in WEIGHT_KEYS if isinstance(obj.get(k), Mapping) and obj[k]}
    if not found:  # a raw state dict
        found = {"model": obj}
    out = {k: _tensors_only(v) for k, v in found.items()}
    if "state_dict" in out and "model" not in out:
        out["model"] = out.pop("state_dict")
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    return {k: len(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="checkpoint you trust")
    p.add_argument("dst", type=Path, help="where to write the tensors-only file")
    args = p.parse_args()
    counts = extract(args.src, args.dst)
    print(f"wrote {args.dst}: " + ", ".join(f"{k} ({n} tensors)" for k, n in counts.items()))


if __name__ == "__main__":
    main()
