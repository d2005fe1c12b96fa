"""Exceptions raised by metasam.

Every error a user can cause derives from :class:`MetaSAMError`, so a caller (or the CLI) can catch
ours apart from genuine bugs. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class MetaSAMError(Exception):
    """Base class of every error metasam raises on bad input or a failed run."""


class ConfigError(MetaSAMError, ValueError):
    """An argument or a combination of arguments is invalid."""


class DatasetError(MetaSAMError):
    """A dataset is missing, incomplete, corrupt, or too small for the episodes asked of it."""


class NonFiniteError(MetaSAMError, FloatingPointError):
    """A loss or gradient became NaN or Inf; parameters were left at their last finite values.

    ``iteration`` (the step that failed, numbered as in metrics.jsonl) and ``tensor`` (which loss or
    gradient) are set where the raiser knows them.
    """

    def __init__(self, message: str, *, iteration: int | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.tensor = tensor


class RunFolderInUse(ConfigError):
    """Another process holds the lock of the run folder (see :class:`metasam.train.run_folder.RunLock`)."""


class CheckpointError(MetaSAMError):
    """A checkpoint is missing, corrupt, or belongs to another model or configuration."""
