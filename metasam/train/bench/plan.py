"""What a ``metasam bench`` trains: its cells (setting × algorithm × grid point × seed), their run
configurations and folders, the controls built from the selected points, and the plan as OUT/bench.json keeps it.

A cell is a normal run folder ``OUT/<ways>w<shots>s/<algo>[/<grid point>]/seed<s>``. Settings given for the
whole bench apply to every algorithm whose configuration takes them (``--inner-rho1`` to the agnostic ones,
``--val-view`` to those with the agnostic inner rule); a grid point's settings override them for its algorithm.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from metasam.errors import ConfigError
from metasam.meta.presets import PRESETS, preset_rules
from metasam.meta.rules import settings_of
from metasam.train.bench.grid import Axis, Tie, format_value, grid_points, parse_grid, point_name
from metasam.train.config import MetaTrainConfig, as_flags, check_int

SETTING = re.compile(r"^(\d+)w(\d+)s$")
CONFIG_KEYS = {f.name for f in fields(MetaTrainConfig)}
LEVELS = ("inner", "outer")


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'5w1s,20w5s' → [(5, 1), (20, 5)]."""
    out = []
    for item in text.split(","):
        match = SETTING.match(item.strip())
        if not match:
            raise ConfigError(f"setting {item!r} is not of the form <ways>w<shots>s, e.g. 5w1s or 20w5s")
        out.append((int(match.group(1)), int(match.group(2))))
    return out


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' → [0, 1, 2]: distinct integers ≥ 0."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma list of integers, e.g. --seeds 0,1,2") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: give distinct integers >= 0, e.g. --seeds 0,1,2")
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    """'1/3' → (1, 3): this process trains the cells whose index is 1 modulo 3."""
    match = re.match(r"^(\d+)/(\d+)$", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard {text!r} is not I/N with 0 <= I < N, e.g. --shard 0/3 (then 1/3 and 2/3)")
    return int(match[1]), int(match[2])


def other_test_rule(cfg: MetaTrainConfig) -> str | None:
    """The test rule of the test-time control of a run: ``gd`` where it adapts with its training rule (``same``)
    and the reverse; None where its inner rule is plain gradient descent (both rules adapt alike)."""
    if PRESETS[cfg.algo].inner == "gd":
        return None
    return "gd" if cfg.test_rule == "same" else "same"


def test_rules(cfg: MetaTrainConfig) -> list[str | None]:
    """Every test rule a table may test the run with: its own (None), then :func:`other_test_rule` if any."""
    other = other_test_rule(cfg)
    return [None] if other is None else [None, other]


@dataclass(frozen=True)
class Cell:
    """One run of the bench; ``point`` holds the grid point's settings as sorted (key, value) pairs."""

    ways: int
    shots: int
    algo: str
    point: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def folder(self) -> Path:
        name = point_name(dict(self.point))
        return Path(f"{self.ways}w{self.shots}s", self.algo, *([name] if name else []), f"seed{self.seed}")


@dataclass(frozen=True)
class Method:
    """A row of the table: an algorithm at a point, trained with every seed, tested with ``test_rule`` (None:
    the runs' own). ``control`` names what the row controls for ('' for a method of --algos)."""

    name: str
    algo: str
    point: tuple[tuple[str, Any], ...]
    test_rule: str | None = None
    control: str = ""

    def cells(self, ways: int, shots: int, seeds: list[int]) -> list[Cell]:
        return [Cell(ways, shots, self.algo, self.point, s) for s in seeds]


@dataclass
class BenchPlan:
    """Everything a bench is run with. ``grids``: the --grid specs as given; ``overrides``: the run settings
    given for every cell; ``rules``: the rule settings given, by level; ``transductive``: False tests each query
    image with the support set alone (``metasam evaluate --non-transductive``); a bench.json written before it
    existed was transductive."""

    settings: list[tuple[int, int]]
    algos: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    grids: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=lambda: {"inner": {}, "outer": {}})
    controls: bool = False
    reference: str = "maml"
    episodes: int = 600
    test_seed: int = 1234
    test_on_finish: bool = False
    transductive: bool = True

    TRAINING = ("settings", "algos", "seeds", "grids", "overrides", "rules")
    """The fields that decide what is trained; the others only what is tested and reported."""

    def __post_init__(self) -> None:
        self.settings = [tuple(s) for s in self.settings]
        if not self.algos:
            raise ConfigError("--algos names no algorithm; pass a comma list such as maml,agnostic-sam")
        unknown = [a for a in self.algos if a not in PRESETS]
        if unknown:
            raise ConfigError(f"--algos: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
        if self.reference not in self.algos:
            raise ConfigError(f"--reference {self.reference} is not one of --algos {','.join(self.algos)}; "
                              f"pass --reference {self.algos[0]} or add {self.reference} to --algos")
        check_int("episodes", self.episodes)
        check_int("test_seed", self.test_seed, 0)
        self.entries: dict[str, list[Axis | Tie]] = {a: [] for a in self.algos}
        for spec in self.grids:
            algo, entry = parse_grid(spec)
            if algo not in self.entries:
                raise ConfigError(f"--grid {spec}: {algo} is not one of --algos {','.join(self.algos)}; add it there")
            self.entries[algo].append(entry)
        for level in LEVELS:
            for name in self.rules[level]:
                if not any(name in settings_of(getattr(PRESETS[a], level)) for a in self.algos):
                    raise ConfigError(f"--{level}-{name.replace('_', '-')} is a setting of none of --algos "
                                      f"{','.join(self.algos)}; drop it, or add an algorithm whose {level} rule takes it")
        if self.overrides.get("val_view", "support") != "support" and not any(PRESETS[a].inner == "agnostic" for a in self.algos):
            raise ConfigError(f"--val-view {self.overrides['val_view']} changes only the agnostic inner rule, which none of "
                              f"--algos {','.join(self.algos)} has; drop it or add agnostic-sam")
        self.points = {a: grid_points(self.entries[a], a) for a in self.algos}

    def methods(self) -> list[Method]:
        """The algorithms of the bench, each at every point of its grid (one point without a grid)."""
        return [Method(a, a, tuple(sorted(p.items()))) for a in self.algos for p in self.points[a]]

    def grid_cells(self) -> list[Cell]:
        """Every cell of the grids, in a fixed order (setting, algorithm, point, seed): the order shards share."""
        return [c for w, s in self.settings for m in self.methods() for c in m.cells(w, s, self.seeds)]

    def config(self, cell: Cell) -> MetaTrainConfig:
        """The run configuration of ``cell``: the bench's settings that its algorithm takes, then its point's."""
        preset = PRESETS[cell.algo]
        settings = dict(self.overrides)
        if preset.inner != "agnostic":
            settings.pop("val_view", None)
        rules = {level: {k: v for k, v in self.rules[level].items() if k in settings_of(getattr(preset, level))}
                 for level in LEVELS}
        for key, value in cell.point:
            if key in CONFIG_KEYS:
                settings[key] = value
            else:
                level, _, name = key.partition("_")
                rules[level][name] = value
        try:
            inner, outer = preset_rules(cell.algo, rules["inner"], rules["outer"])
            return MetaTrainConfig(**settings, ways=cell.ways, shots=cell.shots, algo=cell.algo, seed=cell.seed,
                                   inner_rule=inner, outer_rule=outer)
        except ConfigError as exc:
            where = f"{cell.algo} at {point_name(dict(cell.point))}" if cell.point else cell.algo
            raise ConfigError(f"{cell.ways}w{cell.shots}s {where}: {as_flags(str(exc))}") from exc

    def controls_of(self, ways: int, shots: int, selected: dict[str, Method]) -> list[Method]:
        """The controls of the selected methods (``selected``: algorithm → its selected method), in order:
        for agnostic-sam, sharp-maml-low at ρ = ρ1 − ρ2 (the radius its first inner step has with the support
        set as validation view) and agnostic-sam with β = 0; for every method whose inner rule is not plain
        gradient descent, the same weights adapted at test time by the other test rule. A control that would
        repeat its method (β already 0) is left out."""
        out = []
        for algo, method in selected.items():
            cfg = self.config(method.cells(ways, shots, self.seeds[:1])[0])
            point = dict(method.point)
            if PRESETS[algo] == PRESETS["agnostic-sam"]:
                rho = float(f"{cfg.inner_rule.rho1 - cfg.inner_rule.rho2:.12g}")
                if rho >= 0:
                    kept = {k: v for k, v in point.items() if k in CONFIG_KEYS and k != "val_view"}
                    out.append(Method(f"sharp-maml-low at ρ = ρ1 − ρ2 of {algo}", "sharp-maml-low",
                                      self._radius_point(ways, shots, kept, rho, cfg), control="effective radius"))
                if cfg.inner_rule.beta != 0:
                    out.append(Method(f"{algo} with β = 0", algo, tuple(sorted({**point, "inner_beta": 0.0}.items())),
                                      control="validation momentum"))
            other = other_test_rule(cfg)
            if other:
                out.append(Method(f"{algo}, adapted by {other} at test", algo, method.point, test_rule=other,
                                  control="test-time rule"))
        return out

    def _radius_point(self, ways: int, shots: int, kept: dict[str, Any], rho: float, agnostic: MetaTrainConfig):
        """sharp-maml-low's point: the agnostic point's run settings, ρ, and the SAM settings the agnostic rule
        shares (adaptive, η, detached) where the bench's would differ from them."""
        point = {**kept, "inner_rho": rho}
        plain = self.config(Cell(ways, shots, "sharp-maml-low", tuple(sorted(point.items())), self.seeds[0])).inner_rule
        for name in ("adaptive", "eta", "detach_perturbation"):
            if getattr(plain, name) != getattr(agnostic.inner_rule, name):
                point[f"inner_{name}"] = getattr(agnostic.inner_rule, name)
        return tuple(sorted(point.items()))

    # -- OUT/bench.json -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = [list(s) for s in self.settings]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchPlan":
        return cls(**data)

    def training_differences(self, other: "BenchPlan") -> list[str]:
        """The --flags whose values differ between the two plans in what they train."""
        mine, theirs = self.to_json(), other.to_json()
        return [k for k in self.TRAINING if mine[k] != theirs[k]]

    def command(self, out: str | Path) -> str:
        """The ``metasam bench`` command that runs this plan into ``out``."""
        words = ["metasam", "bench", "--out", str(out), "--algos", ",".join(self.algos),
                 "--settings", ",".join(f"{w}w{s}s" for w, s in self.settings), "--seeds", ",".join(map(str, self.seeds))]
        for spec in self.grids:
            words += ["--grid", spec]
        given = {**self.overrides, **{f"{level}_{k}": v for level in LEVELS for k, v in self.rules[level].items()}}
        for key, value in given.items():
            flag = "--" + key.replace("_", "-")
            words += [flag] if value is True else [flag, format_value(value)]
        words += (["--controls"] if self.controls else []) + ["--reference", self.reference,
                                                               "--episodes", str(self.episodes), "--test-seed", str(self.test_seed)]
        words += ["--test-on-finish"] if self.test_on_finish else []
        words += [] if self.transductive else ["--non-transductive"]
        return shlex.join(words)
