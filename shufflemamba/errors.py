"""The exceptions a user can meet, in a leaf module that imports nothing of the project, so any
layer (data, models, checkpoint, engine) can raise them without depending on the others.

train.py and eval.py print :class:`UserError` (and the two stops) as one line, no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permission, a vanished mount): the run stops;
    the message names the file, the cause and the checkpoint that is intact."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, last.pt untouched since the last good step."""


class StopRequested(Exception):
    """A stop was asked for and a checkpoint written; the run exits with ``exit_code``: 143 after a
    signal (SIGTERM / SIGINT / SIGUSR1), 0 after a stop file (``trainer.stop_file``, the SLURM
    script's pre-emption path: a zero exit keeps torchrun from restarting the workers)."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TorchScriptUnsupported(RuntimeError):
    """``torch.jit.script`` of one of our families: refused with what to use instead."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"torch.jit.script does not support {model}: its scans pick a backend in Python for the device "
            f"their tensors are on, which TorchScript cannot express (and TorchScript is deprecated in PyTorch); "
            f"use torch.compile(model), torch.export.export(model, (x,)) or FX (timm's create_feature_extractor)"
        )
