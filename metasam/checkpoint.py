"""Checkpoints and run files that survive a kill: written atomically, loaded without executing code.

Every file a run writes in place goes through :func:`replace_atomically`: the new content goes to a
temporary file in the same folder, is flushed and fsync'ed, and only then ``os.replace``-d onto the
target (and the folder fsync'ed). A reader, or a run resumed after ``SIGKILL`` at any moment, sees the
previous complete file or the new complete file, never a partial one. If writing fails (disk full, a
read-only folder, a signal) the previous file is untouched, the temporary one removed, and the error says so.
Temporary files are named ``.<name>.<random>.metasam.tmp``, so that a resumed run deletes only its own.
Objects are serialised in memory first: the file system's errors reach the writer as ``OSError``, not as
whatever the serialiser makes of them. A checkpoint saved with ``digest=True`` carries a SHA-256 of its
contents (:func:`content_digest`), which :func:`load_checkpoint` checks.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from metasam.errors import CheckpointError


TEMPORARY_SUFFIX = ".metasam.tmp"
DIGEST_KEY = "content_sha256"


def replace_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The new file gets the mode of the one it replaces, or the mode the umask gives a new file. Raises
    :class:`CheckpointError` when the file system refuses the write (no space left, a read-only folder):
    the message names the file, says the previous version is intact, and what to do.
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc, write) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
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


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file under this process's umask (0644 under umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_error(path: Path, exc: OSError, write: Callable[[IO[bytes]], None]) -> CheckpointError:
    kept = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
    reason, remedy = write_failure(path.parent, exc, write)
    return CheckpointError(f"cannot write {path}: {reason}; {kept}. {remedy}")


def write_failure(folder: Path, exc: OSError, write: Callable[[IO[bytes]], None] | None = None) -> tuple[str, str]:
    """(what went wrong, what to do) when writing into ``folder`` failed with ``exc``: for a full disk the
    space ``write`` needs and the space free, for a refused write the folder to make writable."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = ""
        if write is not None:
            size = io.BytesIO()
            write(size)
            needed = f"It needs {_mib(size.tell())} in {folder} "
        try:
            free = f"{_mib(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        return "no space left on device", f"{needed}({free}): free space there (or choose another folder) and try again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (exc.strerror or str(exc)).lower(), f"Make {folder} writable (or choose another folder) and try again"
    return exc.strerror or str(exc), f"Check {folder} and try again"


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


def save_atomic(obj: Any, path: str | os.PathLike, *, digest: bool = False) -> None:
    """``torch.save(obj)`` onto ``path`` through :func:`replace_atomically`, serialised in memory first.

    ``digest=True`` (``obj`` a dict) stores :func:`content_digest` of ``obj`` under ``"content_sha256"``.
    """
    if digest:
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    replace_atomically(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) onto ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that :func:`replace_atomically`, killed before ``os.replace``, left in
    ``folder`` for the files ``names``; return them. No other file is touched.

    Call it only where no other process writes into ``folder`` (a locked run folder).
    """
    stale = sorted(p for name in names for p in Path(folder).glob(f".{glob.escape(name)}.*{TEMPORARY_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def content_digest(obj: Any) -> str:
    """SHA-256 over the contents of ``obj`` (nested dicts, lists and tuples of tensors and plain values):
    each tensor's dtype, shape and bytes, each plain value's type and ``repr``. A ``"content_sha256"`` key
    of a dict is left out, so a saved digest can be checked against its own checkpoint."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted((k for k in obj if k != DIGEST_KEY), key=repr):
            _feed(h, key)
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__} {obj!r};".encode())


def load_checkpoint(path: str | os.PathLike, *, require_digest: bool = False, mmap: bool = False) -> Any:
    """Load with ``weights_only=True`` (tensors and plain containers only, no code from the file) and check
    the content digest of a file saved with ``digest=True`` (it stays in the returned dict).

    ``require_digest``: refuse a file without one. Raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    saved = obj.get(DIGEST_KEY) if isinstance(obj, dict) else None
    if saved is None and require_digest:
        raise CheckpointError(f"checkpoint {path} has no content hash: it was damaged, or not written by metasam")
    if saved is not None and saved != content_digest(obj):
        raise CheckpointError(
            f"checkpoint {path} fails its content check (its tensors or values differ from what was saved): the file "
            "is damaged or was edited; restore it from a copy, or use the run's other checkpoint"
        )
    return obj


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
