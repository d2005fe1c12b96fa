"""Intervals for the numbers metasam reports: over test tasks (normal) and over seeds (Student t)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 1.96 · sd / √n) with the sample standard deviation (0 for a single value): the normal
    interval over many test tasks (n in the hundreds, where t and normal agree)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(n)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, t_{0.975, n−1} · sd / √n): the 95 % Student-t interval of a mean over few values (seeds),
    NaN half-width for a single value (one seed says nothing about the spread)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
