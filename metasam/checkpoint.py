"""Checkpoints and run files that survive a kill: written atomically, loaded without executing code.

Every file a run writes in place goes through :func:`replace_atomically`: the new content goes to a
temporary file in the same folder, is flushed and fsync'ed, and only then ``os.replace``-d onto the
target (and the folder fsync'ed). A reader, or a run resumed after ``SIGKILL`` at any moment, sees the
previous complete file or the new complete file, never a partial one. If writing fails (disk full, a
signal) the previous file is untouched, the temporary one removed, and the error says so.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from metasam.errors import CheckpointError


def replace_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    Raises :class:`CheckpointError` when the file system refuses the write (e.g. no space left): the
    message names the file, says the previous version is intact, and how many bytes were needed where.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc, write) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc, write) from exc
        raise
    _fsync_folder(path.parent)


def _write_error(path: Path, exc: OSError, write: Callable[[IO[bytes]], None]) -> CheckpointError:
    size = io.BytesIO()
    write(size)
    try:
        free = f"{_mib(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
    reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"{exc.strerror or exc}"
    return CheckpointError(
        f"cannot write {path}: {reason}; {kept}. It needs {_mib(size.tell())} in {path.parent} ({free}): "
        "free space there (or choose another folder) and try again"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a power cut after ``os.replace`` keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` onto ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) onto ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a writer killed before ``os.replace`` left in ``folder``; return them.

    Call it only where no other process writes into ``folder`` (a run folder has one writer).
    """
    stale = sorted(Path(folder).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, no code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines log. A last line without its newline is the trace of a writer killed
    mid-append and is left out; any other line that is not a JSON object raises :class:`CheckpointError`."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or the unterminated tail
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} line {number} is not JSON ({exc.msg}); fix or delete that line") from exc
        if not isinstance(record, dict):
            raise CheckpointError(f"{path} line {number} is not a JSON object; fix or delete that line")
        records.append(record)
    return records


def config_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 6) -> str:
    """'key: saved A, current B; …' for the keys whose values differ (at most ``limit`` listed)."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k, "<absent>") != current.get(k, "<absent>"))
    parts = [f"{k}: {saved.get(k, '<absent>')!r} vs {current.get(k, '<absent>')!r}" for k in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more


def state_dict_mismatch(saved: dict[str, Any], expected: dict[str, Any], limit: int = 4) -> str:
    """How the tensors of ``saved`` differ from ``expected`` by name and shape ('' when they fit)."""
    def first(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} here"
              for k in expected if k in saved and getattr(saved[k], "shape", None) != expected[k].shape]
    parts = [f"missing {first(missing)}" if missing else "", f"unexpected {first(unexpected)}" if unexpected else "",
             f"shapes differ: {first(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)
