"""Intervals for the numbers metasam reports: over test tasks (normal) and over seeds (Student t)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 1.96 · sd / √n) with the sample standard deviation (0 for a single value): the normal
    interval over many test tasks (n in the hundreds, where t and normal agree). Raises ValueError for no
    values."""
    n = _count(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(n)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, t_{0.975, n−1} · sd / √n): the 95 % Student-t interval of a mean over few values (seeds),
    NaN half-width for a single value (one seed says nothing about the spread). Raises ValueError for no
    values."""
    n = _count(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[float, float, list[float]]:
    """(mean, t-interval half-width, per-seed differences) of method a minus method b, paired by seed and task:
    ``a[s][t]`` and ``b[s][t]`` are the accuracies of seed s on test task t (the same seeds, the same fixed tasks),

        d_s = (1/n) Σ_t (a[s][t] − b[s][t]),   mean ± :func:`t_interval` over the seeds' d_s.

    With one seed the half-width is NaN (see :func:`t_interval`). Raises ValueError unless a and b have the
    same number of seeds and, per seed, of tasks."""
    if not a or len(a) != len(b) or any(len(x) != len(y) or not x for x, y in zip(a, b)):
        raise ValueError(f"a paired difference needs the same seeds and tasks on both sides, got "
                         f"{[len(x) for x in a]} and {[len(y) for y in b]} tasks per seed")
    per_seed = [sum(x - y for x, y in zip(xs, ys)) / len(xs) for xs, ys in zip(a, b)]
    mean, half = t_interval(per_seed)
    return mean, half, per_seed


def _count(values: Sequence[float]) -> int:
    if not values:
        raise ValueError("an interval needs at least one value, got none")
    return len(values)
