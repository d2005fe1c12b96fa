"""Checkpoints that are loaded without executing code, and checked against the hash of their contents.

A checkpoint saved with ``save_atomic(..., digest=True)`` (:mod:`metasam.atomic_write`) carries a SHA-256 of
its contents (:func:`content_digest`), which :func:`load_checkpoint` checks; :func:`read_jsonl` reads a
metrics file that a kill may have cut in its last line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from metasam.errors import CheckpointError

DIGEST_KEY = "content_sha256"


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


def _torch_reason(exc: Exception) -> str:
    """torch's reason for refusing a file, in one sentence: what it found (an unsupported global, a damaged
    archive), without its advice to load the file with ``weights_only=False``."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    advice = ("weights_only", "Weights only load failed", "Check the documentation")
    found = next((line for line in lines if line and not any(a in line for a in advice)), "")
    return found.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0].split(". ")[0].rstrip(".")


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
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {_torch_reason(exc)}): metasam loads only "
            "tensors and plain values from a file, never code. The file is damaged or was not written by metasam: "
            "restore it from a copy, or use the run's other checkpoint") from exc
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
