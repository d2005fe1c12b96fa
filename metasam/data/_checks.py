"""Argument checks shared by the dataset constructors: each failure is one ConfigError naming the argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metasam.errors import ConfigError


def check_int(name: str, value: Any, low: int = 1) -> None:
    """An int (not a bool) ≥ ``low``; ``name`` may carry a prefix such as ``"Omniglot: image_size"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """True or False (a string such as "no" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def names(name: str, value: Any) -> list[str]:
    """A list of non-empty strings from a list or tuple of them (a bare string is refused: iterating
    "Greek" would give five one-letter names)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of names (strings), got {value!r}")
    return list(value)
