"""The decoded-image cache: one uint8 tensor file per dataset and options.

A cache file is named by a SHA-256 key over (dataset kind, format version, options, and every source
file's path, size and modification time), so editing, adding or touching a source file makes a new key
and the stale file is simply never read again. Files are written atomically (temporary file in the
same folder, fsync, then ``os.replace``), so a crashed or concurrent writer never leaves a half-written
cache that a reader could pick up. Each file carries a SHA-256 of its contents, checked on every load (about
2 s per GB on one core): a damaged or edited cache is rebuilt, with a warning, instead of being used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from metasam.atomic_write import save_atomic
from metasam.checkpoint import load_checkpoint
from metasam.errors import CheckpointError, ConfigError

CACHE_VERSION = 2  # 2: files carry a content hash. Bump when the decoding of any dataset changes, so old caches are never reused


def default_cache_dir() -> Path:
    """``$METASAM_CACHE`` if set, else ``~/.cache/metasam``."""
    env = os.environ.get("METASAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metasam"


def resolve_cache_dir(cache_dir: str | os.PathLike | None | bool) -> Path | None:
    """``None`` → the default folder; ``False`` → no caching; a path → that folder."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise ConfigError(f"cache_dir must be a path, None (default folder) or False (no cache), got {cache_dir!r}")
    return Path(cache_dir).expanduser()


def source_stamp(paths: Iterable[Path]) -> list[list]:
    """(resolved path, size, mtime in ns) of each source file, in a stable order."""
    stamp = []
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        stamp.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return stamp


def cache_key(kind: str, options: dict, sources: Iterable[Path]) -> str:
    payload = json.dumps(
        {"kind": kind, "version": CACHE_VERSION, "options": options, "sources": source_stamp(sources)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_or_build(
    kind: str,
    options: dict,
    sources: Iterable[Path],
    build: Callable[[], tuple[torch.Tensor, dict]],
    cache_dir: str | os.PathLike | None | bool = None,
) -> tuple[torch.Tensor, dict]:
    """Return ``(images uint8 tensor, metadata dict)`` from the cache, or build them and cache them.

    ``metadata`` must be JSON-serialisable. A cache file that cannot be read or fails its content check is
    rebuilt with a warning; one that cannot be written is skipped with a warning.
    """
    folder = resolve_cache_dir(cache_dir)
    if folder is None:
        return build()
    path = folder / f"{kind}-{cache_key(kind, options, sources)}.pt"
    if path.exists():
        try:
            blob = load_checkpoint(path, require_digest=True, mmap=True)
            return blob["images"], json.loads(blob["meta"])
        except Exception as exc:  # a truncated, damaged or foreign file: rebuild rather than fail
            warnings.warn(f"ignoring unreadable cache file {path} ({exc}); rebuilding it", stacklevel=3)
    images, meta = build()
    _atomic_save({"images": images.contiguous(), "meta": json.dumps(meta)}, path)
    return images, meta


def _atomic_save(obj: dict, path: Path) -> None:
    """Write through :func:`metasam.atomic_write.save_atomic` (a reader never sees a half-written file);
    a cache that cannot be written (no space, read-only folder) is skipped with a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(obj, path, digest=True)
    except (OSError, CheckpointError) as exc:
        warnings.warn(f"cannot write the image cache {path} ({exc}); continuing without it (set METASAM_CACHE to a "
                      "writable folder, or pass cache_dir=False, to stop this warning)", stacklevel=4)
