"""A run folder's safety: never write into a folder of someone else's files, one process per run, a
writable folder checked before any data is loaded.

:class:`RunLock` holds an exclusive ``flock`` on ``RUN/.metasam.lock`` for as long as a process trains in
the folder. The kernel drops the lock when the process exits in any way (SIGKILL included), so a lock
file left behind by a dead process never blocks anyone; the file keeps the last holder's pid, which the
error names while that process lives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

from metasam.atomic_write import write_failure
from metasam.errors import CheckpointError, ConfigError, RunFolderInUse

LOCK_NAME = ".metasam.lock"
RUN_FILES = ("config.json", "val_tasks.json", "last.pt", "best.pt", "metrics.jsonl", "train_summary.json")
"""The files ``metasam train`` writes into a run folder (evaluations and analyses add theirs)."""


def check_new_run_dir(out: str | os.PathLike) -> None:
    """Refuse an ``out`` that holds a run or any other file, or where no folder can be written; nothing is
    created. An empty folder (or one holding only a lock file left by a dead process) is accepted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    found = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if is_run_dir(out):
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"--out {out} holds files that are not a metasam run ({shown}); a new run needs an empty or new "
            "folder, so that none of your files is overwritten: choose another --out")
    check_writable(out)


def check_restartable(run_dir: str | os.PathLike) -> None:
    """Refuse to start again from iteration 0 a run folder without last.pt that has trained (best.pt, metrics
    or a summary): its last.pt was moved or deleted, and starting again would overwrite what it holds."""
    run_dir = Path(run_dir)
    trained = [n for n in ("best.pt", "metrics.jsonl", "train_summary.json") if (run_dir / n).exists()]
    if trained:
        raise CheckpointError(f"{run_dir} has no last.pt but has {', '.join(trained)}: its last.pt was moved or "
                              "deleted; put it back to continue the run, or delete the folder to train it again")


def is_run_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a meta-training run: a config.json with a dataset and an algorithm (the
    first file a run writes)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"dataset", "algo"} <= set(config)


def check_writable(folder: str | os.PathLike) -> None:
    """Create and delete a probe file in ``folder``, or in its nearest existing parent when it does not
    exist yet; raise :class:`ConfigError` saying why no run folder can be written there."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot create {folder}: {existing} is a file, not a folder; choose another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".metasam-probe-", dir=existing)
    except OSError as exc:
        reason, remedy = write_failure(existing, exc)
        raise ConfigError(f"cannot write into {existing} (for {folder}): {reason}. {remedy}") from exc
    os.close(fd)
    os.unlink(probe)


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds the lock of ``folder`` now, as its lock file names them ("pid N on HOST"), or None when no
    process does (or there is no lock file). Nothing is written: the probe takes a shared lock and drops it at
    once, so a process that tries to take the folder in that instant is told it is in use (a bench worker
    passes it over and comes back)."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """The holder a lock file names ("pid N on HOST"), read from its start."""
    return os.read(fd, 200).decode(errors="replace").strip() or "another process"


class RunLock:
    """An exclusive lock on a run folder for this process (re-entrant: a process that holds it may take it
    again). ``create=True`` makes the folder; a folder or lock file this lock created is removed again on
    :meth:`release` if nothing else was written into the folder (a run that failed before it started)."""

    _held: dict[Path, tuple[int, int]] = {}  # resolved folder → (file descriptor, times taken) in this process

    def __init__(self, folder: str | os.PathLike, *, create: bool = False) -> None:
        self.folder = Path(folder).absolute()
        self.path = self.folder / LOCK_NAME
        self.create = create
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        """Take the lock; raise :class:`ConfigError` naming the holder when another process has it."""
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()] if self.create else []
        try:
            if self.create:
                self.folder.mkdir(parents=True, exist_ok=True)
            key = self.folder.resolve()
            if key in self._held:
                fd, count = self._held[key]
                self._held[key] = (fd, count + 1)
                return self
            new_file = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            reason, remedy = write_failure(self.folder, exc)
            raise ConfigError(f"cannot lock the run folder {self.folder}: {reason}. {remedy}") from exc
        self._created = missing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunFolderInUse(
                f"{self.folder} is in use by another metasam process ({holder}); wait for it to finish or stop it, "
                "then try again (one process per run folder)") from exc
        if new_file:
            self._created.insert(0, self.path)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._held[key] = (fd, 1)
        return self

    def release(self) -> None:
        """Give the lock back (once per :meth:`acquire`); the last release closes it, and removes what this
        lock created if the run never wrote anything."""
        key = self.folder.resolve()
        fd, count = self._held.pop(key, (None, 0))
        if count > 1:
            self._held[key] = (fd, count - 1)
            return
        if fd is None:
            return
        try:
            if [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:  # the run never started: leave no trace
                for p in self._created:  # the lock file, the folder, then the parents it created, deepest first
                    try:
                        p.unlink() if p == self.path else p.rmdir()
                    except OSError as exc:
                        if exc.errno != errno.ENOTEMPTY:
                            raise
                        break  # another process made a folder of its own in it meanwhile (a bench's next cell)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
