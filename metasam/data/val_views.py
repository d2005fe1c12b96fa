"""The agnostic inner rule's validation view of a support set: the seed paper's duplicate, and two views that
are NOT the paper's, for testing whether a real validation signal changes anything.

One inner step of the agnostic rule on a task (docs/algorithms.md §3), with S the task's support set (all N·K
images) and V = view(S):

    m ← β m + (1 − β) ∇L_V(φ)     (m = ∇L_V(φ) at the first step)
    ε = ρ1 · unit(∇L_S(φ)) − ρ2 · unit(m)
    φ ← φ − α ∇L_S(φ + ε)

- ``support`` (the seed paper's, the default): V = S, so ∇L_V = ∇L_S and, at one inner step, the rule trains
  exactly like SAM with radius ρ1 − ρ2 (sharp-maml-low).
- ``split`` (not the paper's; K ≥ 2): V = ⌊K/2⌋ of each class's K support images, at shot positions drawn once
  from the run's seed. EpisodeSampler draws each class's images in random order, so this is a random half of
  every task's support set.
- ``augment`` (not the paper's; any K): V = S with each image shifted circularly by a nonzero (dy, dx) in
  {−2, …, 2}², one shift per support position drawn once from the run's seed; the labels are S's.

The training gradient ∇L_S stays on the whole support set for every view: holding V out of it would adapt on
⌈K/2⌉ images per class where every other method adapts on K, an effect on accuracy of its own that would be
confounded with the validation signal. The view changes only the direction m that ρ2 steps against.

A view maps (support_x [N·K, C, H, W], support_y [N·K]) to (x', y'), in EpisodeSampler's order (support_y =
[0]*K + [1]*K + …). It is a pure function of its input (precomputed indices and shifts; no random draw while
it runs), so it runs under ``torch.func.vmap`` and in several threads at once. Depends on nothing of metasam
but :mod:`metasam.errors`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metasam.errors import ConfigError

VAL_VIEWS = ("support", "split", "augment")
"""The views a run configuration can name; "support" is the seed paper's."""
ValView = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
MAX_SHIFT = 2
"""Pixels of the augment view's largest shift (of 28 for Omniglot-sized images)."""


class SplitView:
    """V = the images at ⌊K/2⌋ seeded shot positions of each class (the same positions in every task)."""

    def __init__(self, ways: int, shots: int, seed: int) -> None:
        check_val_view("split", shots)
        generator = torch.Generator().manual_seed(seed)
        self.positions = sorted(torch.randperm(shots, generator=generator)[: shots // 2].tolist())
        self.ways, self.shots = ways, shots
        self.rows = torch.tensor([c * shots + j for c in range(ways) for j in self.positions])
        self.spec = {"val_view": "split", "ways": ways, "shots": shots, "seed": seed}

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _check_rows(x, self.ways, self.shots, "split")
        rows = self.rows.to(x.device)
        return x.index_select(0, rows), y.index_select(0, rows)

    def __repr__(self) -> str:
        return f"SplitView(ways={self.ways}, shots={self.shots}, positions={self.positions})"


class ShiftView:
    """V = S with support image i shifted circularly by ``shifts[i]`` = (dy, dx) ≠ (0, 0), |dy|, |dx| ≤ 2."""

    def __init__(self, ways: int, shots: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        choices = [(dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1) for dx in range(-MAX_SHIFT, MAX_SHIFT + 1)
                   if (dy, dx) != (0, 0)]
        picks = torch.randint(len(choices), (ways * shots,), generator=generator).tolist()
        self.shifts = [choices[i] for i in picks]
        self.ways, self.shots = ways, shots
        self.spec = {"val_view": "augment", "ways": ways, "shots": shots, "seed": seed}

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _check_rows(x, self.ways, self.shots, "augment")
        return torch.stack([torch.roll(x[i], shift, dims=(-2, -1)) for i, shift in enumerate(self.shifts)]), y

    def __repr__(self) -> str:
        return f"ShiftView(ways={self.ways}, shots={self.shots}, shifts={self.shifts})"


def make_val_view(kind: str, ways: int, shots: int, seed: int) -> ValView | None:
    """The view named ``kind`` for N-way K-shot support sets, seeded by ``seed``; None for "support" (the
    learner then duplicates the support set itself)."""
    check_val_view(kind, shots)
    if kind == "support":
        return None
    return (SplitView if kind == "split" else ShiftView)(ways, shots, seed)


def val_view_from_spec(spec: dict) -> ValView | None:
    """The view a checkpoint recorded as ``view.spec`` (``{"val_view": kind, "ways", "shots", "seed"}``)."""
    try:
        return make_val_view(spec["val_view"], spec["ways"], spec["shots"], spec["seed"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{spec!r} does not describe a validation view (missing {exc})") from exc


def check_val_view(kind: str, shots: int) -> None:
    """Raise :class:`ConfigError` unless ``kind`` is a view that K = ``shots`` support images allow."""
    if kind not in VAL_VIEWS:
        raise ConfigError(f"unknown --val-view {kind!r}; choose one of {', '.join(VAL_VIEWS)}")
    if kind == "split" and shots < 2:
        raise ConfigError(f"--val-view split takes half of each class's support images, which needs --shots 2 or "
                          f"more (got {shots}); at 1 shot use --val-view augment")


def _check_rows(x: Tensor, ways: int, shots: int, kind: str) -> None:
    if x.shape[0] != ways * shots:
        raise ConfigError(f"the {kind} validation view was made for {ways}-way {shots}-shot support sets of "
                          f"{ways * shots} images, got {x.shape[0]}; make it with the task's ways and shots")
