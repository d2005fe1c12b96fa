"""Checkpoints that survive a kill: written atomically, loaded without executing code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from metasam.errors import CheckpointError


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace onto ``path``.

    A reader sees either the previous complete file or the new complete file, never a partial one; if
    writing fails (disk full, a kill) the previous file is untouched and the temporary one removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, no code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
