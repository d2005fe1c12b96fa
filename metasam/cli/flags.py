"""Flags whose ``--help`` line always states the default, and the rule flags generated from the rules."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from metasam.meta.presets import PRESETS
from metasam.meta.rules import RULES

RULE_HELP = {
    "rho": "ρ, the radius of the SAM perturbation",
    "rho1": "ρ1, the radius of the ascent along the training gradient",
    "rho2": "ρ2, the radius of the step against the validation momentum",
    "beta": "β, the decay of the validation momentum",
    "adaptive": "scale the radius by |θ| + η (ASAM)",
    "eta": "η of ASAM's scale |θ| + η",
    "detach_perturbation": "treat the perturbation as a constant (no gradient through it; cheaper)",
}


def add(parser: argparse.ArgumentParser, *names: str, help: str, **kwargs: Any) -> None:
    """``parser.add_argument`` with ``(default: X)`` appended to ``help`` when there is a default to state
    (not None, not False); a None default is described in ``help`` itself."""
    default = kwargs.get("default")
    if default is not None and default is not False and "default" not in help:
        help += f" (default: {default})"
    parser.add_argument(*names, help=help, **kwargs)


def add_rule_flags(parser: argparse.ArgumentParser, keys: list[str]) -> None:
    """``--inner-rho1``, ``--outer-beta``, …: one flag per rule hyperparameter, with the rule's default and the
    algorithms that use it."""
    for key in keys:
        level, _, param = key.partition("_")
        kinds = [kind for kind, rule in RULES.items() if param in {f.name for f in fields(rule)}]
        default = next(f.default for f in fields(RULES[kinds[0]]) if f.name == param)
        algos = [a for a, p in PRESETS.items() if getattr(p, level) in kinds]
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        text = f"{level} rule: {RULE_HELP[param]}; used by {', '.join(algos)} (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, action="store_true", default=None, help=text)
        else:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(default), default=None, help=text)
