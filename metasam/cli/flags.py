"""Flags whose ``--help`` line always states the default, and the flags generated from the run configuration:
one per :class:`~metasam.train.config.MetaTrainConfig` setting and one per level and rule setting, shared by
``metasam train`` and ``metasam bench`` so that the two cannot drift apart."""

from __future__ import annotations

import argparse
from dataclasses import Field, fields
from typing import Any, get_args, get_type_hints

from metasam.errors import ConfigError
from metasam.meta.presets import PRESETS, preset_rules
from metasam.meta.rules import RULES, Rule
from metasam.train.config import MetaTrainConfig, as_flags

def add(parser: argparse.ArgumentParser, *names: str, help: str, **kwargs: Any) -> None:
    """``parser.add_argument`` with ``(default: X)`` appended to ``help`` when there is a default to state
    (not None, not False); a None default is described in ``help`` itself."""
    default = kwargs.get("default")
    if default is not None and default is not False and "default" not in help:
        help += f" (default: {default})"
    parser.add_argument(*names, help=help, **kwargs)


LEVELS = ("inner", "outer")
NON_TRANSDUCTIVE_HELP = (
    "predict each query image in a batch of its own with the support set (Nichol et al. 2018), so that no prediction "
    "depends on the other queries through BatchNorm's batch statistics; one forward of the support set and one image "
    "per query, slower. Default: the query set in one batch (transductive, MAML's protocol, as in training and "
    "validation)")


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


def rule_flags_given(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The rule settings given on the command line, by level: ``{"inner": {"rho1": 0.1}, "outer": {}}``."""
    return {level: {name: getattr(args, f"{level}_{name}") for name in rule_settings()
                    if getattr(args, f"{level}_{name}", None) is not None} for level in LEVELS}


def rules_from_flags(args: argparse.Namespace) -> tuple[Rule, Rule]:
    """The (inner, outer) rules of ``args.algo`` with the rule flags given; a flag the preset's rule at its
    level does not take is refused, naming what it takes."""
    given = rule_flags_given(args)
    try:
        return preset_rules(args.algo or MetaTrainConfig.algo, given["inner"], given["outer"])
    except ConfigError as exc:  # spell the settings as the flags the user typed
        raise ConfigError(as_flags(str(exc))) from exc


def run_settings() -> list[Field]:
    """The :class:`MetaTrainConfig` fields that are flags (those with help text), in their dataclass order."""
    return [f for f in fields(MetaTrainConfig) if "help" in f.metadata]


def add_run_flags(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """``--dataset`` … ``--val-view`` (one per :func:`run_settings` field but ``leave_out``), then the rule flags.

    Each flag takes its name, type, help and choices from the field; its default is None ("not given": the
    configuration fills in the field's default, which the help states), so that a command can tell a setting
    the user gave from one left alone. A bool field is a switch."""
    hints = get_type_hints(MetaTrainConfig)
    for f in run_settings():
        if f.name in leave_out:
            continue
        kind = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        text = f.metadata["help"]
        if f.default is not None and f.default is not False and "default" not in text:
            text += f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, **{"type": kind, **f.metadata["flag"]}, default=None, help=text)
    add_rule_flags(parser)


def settings_given(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`run_settings` given on the command line (not None), by field name."""
    return {f.name: getattr(args, f.name) for f in run_settings() if getattr(args, f.name, None) is not None}
