"""Hyperparameter grids of ``metasam bench``: ``--grid ALGO:KEY=V1,V2,…`` and tied settings ``KEY=OTHER/2``.

A key is a :class:`~metasam.train.config.MetaTrainConfig` setting (``inner_lr``, ``outer_lr``, ``val_view``, …)
or a rule setting of a level (``inner_rho``, ``inner_rho1``, ``outer_beta``, …). An algorithm's grid points are
the product of its value lists, in the order given; a tied key takes its value from another key of the same
point, in a language of two forms and nothing else (no Python is evaluated):

    KEY=OTHER*NUMBER      KEY=OTHER/NUMBER

OTHER is another key of the grid, or the short name of a rule setting at KEY's level (``inner_rho2=rho1/2`` is
``inner_rho2=inner_rho1/2``). A tied value is rounded to 12 significant digits, so 0.01/2 is 0.005.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from typing import Any, get_args, get_type_hints

from metasam.errors import ConfigError
from metasam.meta.rules import RULES
from metasam.train.config import MetaTrainConfig

SPEC = re.compile(r"^([a-z0-9-]+):([a-z0-9_]+)=(.+)$")
TIE = re.compile(r"^([a-z][a-z0-9_]*)([*/])([0-9.]+(?:e-?[0-9]+)?)$")
FIXED = {
    "algo": "--algos", "ways": "--settings", "shots": "--settings", "seed": "--seeds", "dataset": "--dataset",
    "data_root": "--data-root", "device": "--device", "train_split": "--train-split", "val_split": "--val-split",
    "val_tasks": "--val-tasks", "test_split": "--test-split", "task_threads": "--task-threads",
}
"""Settings a grid may not vary, with the flag that sets them: the grid's axes, the machine, and the data
(points compared on different validation tasks would be chosen on different questions)."""


@dataclass(frozen=True)
class Axis:
    """A gridded key and its values, in the order given."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Tie:
    """``key`` = value of ``of`` at the same point, times or divided by ``factor``."""

    key: str
    of: str
    op: str
    factor: float

    def value(self, point: dict[str, Any]) -> float:
        base = point[self.of]
        return float(f"{(base * self.factor if self.op == '*' else base / self.factor):.12g}")


def grid_keys() -> dict[str, type]:
    """Every key a grid may set, with its type."""
    hints = get_type_hints(MetaTrainConfig)
    keys = {f.name: next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            for f in fields(MetaTrainConfig) if "help" in f.metadata and f.name not in FIXED}
    for rule in RULES.values():
        for f in fields(rule):
            for level in ("inner", "outer"):
                keys.setdefault(f"{level}_{f.name}", type(f.default))
    return keys


def parse_grid(spec: str) -> tuple[str, Axis | Tie]:
    """``"agnostic-sam:inner_rho1=0.01,0.02"`` → ("agnostic-sam", Axis("inner_rho1", (0.01, 0.02)))."""
    match = SPEC.match(spec.replace(" ", ""))
    if not match:
        raise ConfigError(f"--grid {spec!r} is not of the form ALGO:KEY=V1,V2 (e.g. sharp-maml-low:inner_rho=0.005,0.01) "
                          "or ALGO:KEY=OTHER/NUMBER (e.g. agnostic-sam:inner_rho2=rho1/2)")
    algo, key, text = match.groups()
    keys = grid_keys()
    if key in FIXED:
        raise ConfigError(f"--grid {spec}: {key} is the same for every cell of a bench; set it with {FIXED[key]}")
    if key not in keys:
        raise ConfigError(f"--grid {spec}: no setting {key!r}; a grid varies one of {', '.join(sorted(keys))}")
    tie = TIE.match(text)
    if tie:
        of = tie[1] if tie[1] in keys else f"{key.partition('_')[0]}_{tie[1]}"
        if keys[key] is not float or keys.get(of) is not float:
            raise ConfigError(f"--grid {spec}: a tie sets a number from a number; {key} or {tie[1]} is not a float setting")
        return algo, Tie(key, of, tie[2], float(tie[3]))
    values = tuple(_value(keys[key], v, spec) for v in text.split(","))
    if len(set(values)) != len(values):
        raise ConfigError(f"--grid {spec}: a value is listed twice; list each once")
    return algo, Axis(key, values)


def _value(kind: type, text: str, spec: str) -> Any:
    try:
        if kind is bool:
            return {"true": True, "on": True, "false": False, "off": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        shown = "true or false" if kind is bool else f"a {kind.__name__}"
        raise ConfigError(f"--grid {spec}: {text!r} is not {shown}") from None


def grid_points(entries: list[Axis | Tie], algo: str) -> list[dict[str, Any]]:
    """The points of one algorithm's grid: the product of its axes (the first varies slowest), each with its
    tied keys filled in; one empty point without a grid."""
    axes = [e for e in entries if isinstance(e, Axis)]
    ties = [e for e in entries if isinstance(e, Tie)]
    keys = [e.key for e in entries]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"--grid {algo}:{twice[0]} is given twice; give each setting of {algo} one --grid")
    for tie in ties:
        if tie.of not in {a.key for a in axes}:
            raise ConfigError(f"--grid {algo}:{tie.key}: {tie.of} is not a listed setting of {algo}'s grid; "
                              f"grid it too (--grid {algo}:{tie.of}=V1,V2)")
    points = []
    for values in itertools.product(*(a.values for a in axes)):
        point = dict(zip((a.key for a in axes), values))
        points.append({**point, **{t.key: t.value(point) for t in ties}})
    return points


def point_name(point: dict[str, Any]) -> str:
    """The folder of a grid point: ``inner_rho1=0.01,inner_rho2=0.005`` (keys sorted); '' for no point."""
    return ",".join(f"{k}={format_value(point[k])}" for k in sorted(point))


def format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def edges(entries: list[Axis | Tie], point: dict[str, Any]) -> list[str]:
    """For each numeric axis of two or more values where ``point`` sits at the smallest or largest value, a note
    such as ``inner_rho1=0.01 is the smallest of 0.01, 0.05``: the best value may lie outside the grid."""
    notes = []
    for axis in entries:
        if not isinstance(axis, Axis) or len(axis.values) < 2 or isinstance(axis.values[0], (bool, str)):
            continue
        value = point[axis.key]
        end = "smallest" if value == min(axis.values) else "largest" if value == max(axis.values) else None
        if end:
            notes.append(f"{axis.key}={format_value(value)} is the {end} of {', '.join(map(format_value, sorted(axis.values)))}")
    return notes
