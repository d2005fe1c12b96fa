"""Named algorithms as data: (inner rule, outer rule, first order) — the preset table of docs/algorithms.md §3."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
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

RULE_PARAMS = {"gd": (), "plain": (), "sam": ("rho", "adaptive", "eta", "detach_perturbation"),
               "agnostic": ("rho1", "rho2", "beta", "adaptive", "eta", "detach_perturbation")}
"""The hyperparameters each rule takes; the learner accepts them prefixed ``inner_`` / ``outer_``."""
