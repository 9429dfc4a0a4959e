"""Checkpoint files, all of them: reading any weight file safely, loading weights into a model,
and writing / restoring the resumable training state.

Reading: files are opened with ``torch.load(weights_only=True)``; the only class allowed
beyond tensors and plain containers is ``argparse.Namespace`` (official files pickle their
``args``). A file that needs anything else is refused with the name of the global, never
unpickled without restriction. Our own checkpoints hold only tensors and containers.

Writing: to a temporary file in the same folder, fsync, rename over the old one, so a crash
during a save never corrupts the previous checkpoint.

The training state is declared once, as a :class:`TrainingState` of named components that
each have ``state_dict`` / ``load_state_dict`` (the pattern of
``torch.distributed.checkpoint.stateful.Stateful``): the same list is saved and restored, so a
new component cannot be saved and forgotten on resume.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.models import clean_state_dict
from torch import Tensor, nn

from .errors import CheckpointError, CheckpointWriteError

SAFE_GLOBALS: list[Any] = [argparse.Namespace]

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Stateful",
    "TrainingState",
    "load_for_finetune",
    "load_weights",
    "pick_weights",
    "read_checkpoint",
    "save_atomic",
]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True and the Namespace allow-list; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects outside the safe allow-list (tensors, containers, argparse.Namespace); "
            f"refusing to unpickle it (if you trust the file, e.g. an official VMamba release with its yacs "
            f"config, copy its weights out once: python scripts/extract_weights.py {path} weights.pth). "
            f"torch said: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict or a state dict")
    return dict(obj)


WEIGHT_KEYS = ("model", "state_dict")  # where a weight file may keep its weights: ours / official Vim, DeiT: model
EMA_KEY = "model_ema"


def pick_weights(checkpoint: Mapping[str, Any], use_ema: bool | None = None) -> tuple[dict[str, Tensor], str]:
    """The weights to load from any checkpoint dict, and which they are (``"ema"`` or ``"raw"``).

    ``use_ema`` (``eval.ema`` / ``checkpoint.finetune_ema``): ``True`` requires the EMA weights,
    ``False`` takes the raw ones, ``None`` takes the weights our best.pt was chosen by (its
    ``best_weights``), else EMA when present. A dict without a wrapper key is a raw state dict.
    The DDP / torch.compile prefixes are removed (timm's ``clean_state_dict``).
    """
    wrapped = any(k in checkpoint for k in (*WEIGHT_KEYS, EMA_KEY))
    has_ema = wrapped and isinstance(checkpoint.get(EMA_KEY), Mapping) and len(checkpoint[EMA_KEY]) > 0
    if use_ema is None and checkpoint.get("best_weights") in ("ema", "raw"):
        use_ema = checkpoint["best_weights"] == "ema"
    if use_ema and not has_ema:
        where = f"it has no {EMA_KEY!r} (keys: {sorted(checkpoint)})" if wrapped else "it is a raw state dict"
        raise CheckpointError(
            f"EMA weights asked for but {where}; take the raw ones (eval.ema=false / checkpoint.finetune_ema=false)"
        )
    if has_ema and use_ema is not False:
        return clean_state_dict(dict(checkpoint[EMA_KEY])), "ema"
    if not wrapped:
        return clean_state_dict(dict(checkpoint)), "raw"
    for key in WEIGHT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return clean_state_dict(dict(checkpoint[key])), "raw"
    wanted = " or ".join(map(repr, WEIGHT_KEYS))
    raise CheckpointError(f"checkpoint has no {wanted} weights (keys: {sorted(checkpoint)})")


def convert_for(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Foreign names and shapes -> ``model``'s, by the family's converter
    (:func:`shufflemamba.models.checkpoint_filter`: position-embedding resize, official names,
    MambaOut's original names, ...); unchanged for a family without one."""
    from .models import checkpoint_filter  # the families import nothing of this module

    convert = checkpoint_filter(model)
    return convert(state_dict, model) if convert is not None else state_dict


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], use_ema: bool | None = None) -> str:
    """Load weights into ``model`` strictly, resizing the position embedding if needed.

    ``source`` is a path or an already-loaded dict; returns which weights were taken (``"ema"``
    or ``"raw"``). Raises :class:`CheckpointError` listing the missing, unexpected and
    mis-shaped keys when the weights do not fit.
    """
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    state, which = pick_weights(checkpoint, use_ema)
    _load_strictly(model, convert_for(model, state))
    return which


def load_for_finetune(model: nn.Module, source: str | os.PathLike, use_ema: bool | None = None) -> list[str]:
    """Start a new run from any supported weight file: as :func:`load_weights`, except that a
    classifier of another shape (another class count) keeps the model's fresh initialisation.
    Returns what was adapted, for the log (weights taken, position embedding resized, head)."""
    state, which = pick_weights(read_checkpoint(source), use_ema)
    notes = [f"{'EMA' if which == 'ema' else 'raw'} weights"]
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        notes.append(f"position embedding resized {tuple(pos.shape)} -> {tuple(own['pos_embed'].shape)}")
    state = convert_for(model, state)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    head_keys = [k for k in own if isinstance(classifier, str) and k.startswith(f"{classifier}.")]
    changed = [k for k in head_keys if k in state and state[k].shape != own[k].shape]
    if changed:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in changed)
        notes.append(f"classifier re-initialised for another class count ({shapes})")
        state.update({k: own[k] for k in head_keys})
    fresh = [k for k in own if k.startswith("layer_shuffle.") and k not in state]
    dropped = [k for k in state if k.startswith("layer_shuffle.") and k not in own]
    if fresh:  # a new run with LayerShuffle's variant weights: they start from their own init
        state.update({k: own[k] for k in fresh})
        notes.append(f"LayerShuffle weights initialised afresh ({len(fresh)} tensors)")
    if dropped:
        state = {k: v for k, v in state.items() if k not in dropped}
        notes.append(f"the source's LayerShuffle weights left out ({len(dropped)} tensors)")
    _load_strictly(model, state)
    return notes


def _load_strictly(model: nn.Module, state: dict[str, Tensor]) -> None:
    """``load_state_dict(strict=True)``, or one error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mis_shaped:
        lines = ["checkpoint does not match the model (wrong model size or class count?)"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = keys[:20] + ([f"... {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in ``path``'s folder, fsync, then rename over ``path``.

    A write that fails (disk full, no permission, a vanished mount) leaves ``path`` as it was and
    no temporary file, and raises :class:`CheckpointWriteError` naming the file and the cause.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as RuntimeError
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise CheckpointWriteError(f"cannot write {path}: {cause}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class Stateful(Protocol):
    """What a training-state component provides (as modules, optimizers and schedulers do)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class TrainingState:
    """Everything a run needs to resume, declared once: ``{key: component}``.

    ``state_dict()`` asks every component (collectively, if a component gathers over ranks) and
    adds ``extra`` entries for readers other than resume (eval reads ``best_weights``, people
    read ``config``); ``load_state_dict()`` restores every component and fails with the names
    of any it cannot find, so a checkpoint written without a component is never half-resumed.
    """

    def __init__(self, components: Mapping[str, Stateful]) -> None:
        self.components = dict(components)

    def state_dict(self, **extra: Any) -> dict[str, Any]:
        clash = set(extra) & set(self.components)
        if clash:
            raise ValueError(f"extra checkpoint entries {sorted(clash)} would overwrite training-state components")
        return {**{key: c.state_dict() for key, c in self.components.items()}, **extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [key for key in self.components if key not in state]
        if missing:
            raise CheckpointError(
                f"not a resumable checkpoint of this run: no {missing} (keys: {sorted(state)}); "
                f"start a new run or fine-tune from its weights instead"
            )
        for key, component in self.components.items():
            component.load_state_dict(state[key])

    def save(self, paths: list[Path], **extra: Any) -> None:
        """Write the same state to each path (atomically). Call on every rank: components may
        gather across ranks; ``paths`` is empty on ranks that do not write."""
        state = self.state_dict(**extra)
        for path in paths:
            save_atomic(state, path)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore every component from ``path``; returns the whole file (its extra entries too)."""
        state = read_checkpoint(path)
        self.load_state_dict(state)
        return state
