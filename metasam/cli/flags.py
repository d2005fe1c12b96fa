"""Flags whose ``--help`` line always states the default, and the rule flags generated from the rules."""

from __future__ import annotations

import argparse
from dataclasses import Field, fields
from typing import Any

from metasam.errors import ConfigError
from metasam.meta.presets import PRESETS, preset_rules
from metasam.meta.rules import RULES, Rule
from metasam.train.config import as_flags

def add(parser: argparse.ArgumentParser, *names: str, help: str, **kwargs: Any) -> None:
    """``parser.add_argument`` with ``(default: X)`` appended to ``help`` when there is a default to state
    (not None, not False); a None default is described in ``help`` itself."""
    default = kwargs.get("default")
    if default is not None and default is not False and "default" not in help:
        help += f" (default: {default})"
    parser.add_argument(*names, help=help, **kwargs)


LEVELS = ("inner", "outer")


def rule_settings() -> dict[str, Field]:
    """Every setting of metasam's rules by name (rho, rho1, rho2, beta, adaptive, eta, detach_perturbation),
    as the rule dataclasses define it: type, default and help text."""
    settings: dict[str, Field] = {}
    for rule in RULES.values():
        for f in fields(rule):
            settings.setdefault(f.name, f)
    return settings


def add_rule_flags(parser: argparse.ArgumentParser) -> None:
    """``--inner-rho1``, ``--outer-beta``, …: one flag per level and rule setting, generated from the rule
    dataclasses' fields (name, type, default, help), with the algorithms that use it."""
    for level in LEVELS:
        for name, f in rule_settings().items():
            kinds = [kind for kind, rule in RULES.items() if name in {g.name for g in fields(rule)}]
            algos = [a for a, p in PRESETS.items() if getattr(p, level) in kinds]
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            text = f"{level} rule: {f.metadata['help']}; used by {', '.join(algos)} (default: {shown})"
            flag, dest = f"--{level}-{name.replace('_', '-')}", f"{level}_{name}"
            if isinstance(f.default, bool):
                parser.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
            else:
                parser.add_argument(flag, dest=dest, type=type(f.default), default=None, help=text)


def rules_from_flags(args: argparse.Namespace) -> tuple[Rule, Rule]:
    """The (inner, outer) rules of ``args.algo`` with the rule flags given; a flag the preset's rule at its
    level does not take is refused, naming what it takes."""
    given = {level: {name: getattr(args, f"{level}_{name}") for name in rule_settings()
                     if getattr(args, f"{level}_{name}", None) is not None} for level in LEVELS}
    try:
        return preset_rules(args.algo, given["inner"], given["outer"])
    except ConfigError as exc:  # spell the settings as the flags the user typed
        raise ConfigError(as_flags(str(exc))) from exc
