"""Files that survive a kill: every file a run writes in place is written atomically.

Every file goes through :func:`replace_atomically`: the new content goes to a temporary file in the same
folder, is flushed and fsync'ed, and only then ``os.replace``-d onto the target (and the folder fsync'ed). A
reader, or a run resumed after ``SIGKILL`` at any moment, sees the previous complete file or the new complete
file, never a partial one. If writing fails (disk full, a read-only folder, a signal) the previous file is
untouched, the temporary one removed, and the error says so. Temporary files are named
``.<name>.<random>.metasam.tmp``, so that a resumed run deletes only its own. Objects are serialised in memory
first: the file system's errors reach the writer as ``OSError``, not as whatever the serialiser makes of them.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from metasam.checkpoint import DIGEST_KEY, content_digest
from metasam.errors import CheckpointError

TEMPORARY_SUFFIX = ".metasam.tmp"


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
