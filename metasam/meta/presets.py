"""Named algorithms as data: (inner rule, outer rule, first order) — the preset table of docs/algorithms.md §3."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from metasam.errors import ConfigError
from metasam.meta.rules import Rule, make_rule, settings_of


@dataclass(frozen=True)
class Preset:
    """A named algorithm: the rule of each level and the order of the meta-gradient. ``maml`` is
    (gd, plain); Sharp-MAML puts ``sam`` at the inner level (low), the outer (up) or both; Agnostic-SAM puts
    ``agnostic`` there. ``first_order``: the meta-gradient drops the second-order term (FOMAML)."""

    inner: str  # gd | sam | agnostic
    outer: str  # plain | sam | agnostic
    first_order: bool = False


PRESETS: dict[str, Preset] = {
    "maml": Preset("gd", "plain"),
    "fomaml": Preset("gd", "plain", first_order=True),
    "sharp-maml-low": Preset("sam", "plain"),
    "sharp-maml-up": Preset("gd", "sam"),
    "sharp-maml-both": Preset("sam", "sam"),
    "agnostic-sam": Preset("agnostic", "plain"),
    "agnostic-sam-up": Preset("gd", "agnostic"),
    "agnostic-sam-both": Preset("agnostic", "agnostic"),
}



def preset_rules(algo: str, inner: dict[str, Any] | None = None, outer: dict[str, Any] | None = None) -> tuple[Rule, Rule]:
    """The (inner, outer) rules of preset ``algo``, with the settings ``inner`` and ``outer`` given (the rules'
    defaults for the others): ``preset_rules("agnostic-sam", {"rho1": 0.1, "rho2": 0.05})``.

    Raises :class:`ConfigError` for an unknown preset, a setting its rule at that level does not have, or a
    bad value, naming the setting with its level (``inner_rho must be ...``)."""
    if algo not in PRESETS:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[algo]
    rules = []
    for level, kind, given in (("inner", preset.inner, inner or {}), ("outer", preset.outer, outer or {})):
        unused = sorted(set(given) - set(settings_of(kind)))
        if unused:
            takes = ", ".join(f"{level}_{k}" for k in settings_of(kind)) or "nothing"
            raise ConfigError(f"{algo} does not use {', '.join(f'{level}_{k}' for k in unused)}: its {level} rule is "
                              f"{kind!r}, which takes {takes}")
        try:
            rules.append(make_rule(kind, **given))
        except ConfigError as exc:  # "sam rule: rho must be ..." names the setting as given: inner_rho
            raise ConfigError(re.sub(rf"^{kind} rule: (\w+)", rf"{level}_\1", str(exc))) from exc
    return rules[0], rules[1]

