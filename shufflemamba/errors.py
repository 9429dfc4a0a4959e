"""The exceptions a user can meet, in a leaf module that imports nothing of the project, so any
layer (data, models, checkpoint, engine) can raise them without depending on the others.

train.py and eval.py print :class:`UserError` (and the two stops) as one line, no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, paths, data): printed as one line, no traceback."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, last.pt untouched since the last good step."""


class StopRequested(Exception):
    """SIGTERM/SIGINT (e.g. SLURM pre-emption): a checkpoint was written, the run exits."""
