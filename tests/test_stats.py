"""The intervals metasam reports, against numbers computed by hand."""

from __future__ import annotations

import math

import pytest

from metasam.stats import mean_ci95, paired_difference, t_interval


def test_t_interval_of_three_seeds_by_hand():
    mean, half = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t_{0.975, 2} from a table
    assert math.isnan(t_interval([0.4])[1])


def test_paired_difference_pairs_seeds_and_tasks():
    a = [[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]]
    b = [[0.5, 0.5, 0.5], [0.0, 1.0, 1.0]]
    mean, half, per_seed = paired_difference(a, b)
    assert per_seed == pytest.approx([(0.5 + 0.0 - 0.5) / 3, (0.5 - 0.5 + 0.0) / 3])
    assert mean == pytest.approx(0.0) and half == pytest.approx(0.0)
    mean, half, per_seed = paired_difference([[0.6, 0.8], [0.7, 0.9]], [[0.5, 0.5], [0.5, 0.5]])
    assert per_seed == pytest.approx([0.2, 0.3]) and mean == pytest.approx(0.25)
    assert half == pytest.approx(12.706204736174707 * math.sqrt(0.005) / math.sqrt(2))
    with pytest.raises(ValueError, match="the same seeds and tasks"):
        paired_difference([[0.5, 0.5]], [[0.5]])
    with pytest.raises(ValueError, match="the same seeds and tasks"):
        paired_difference([[0.5], [0.5]], [[0.5]])


def test_mean_ci95_uses_the_sample_sd_by_hand():
    mean, half = mean_ci95([1.0, 0.0, 1.0, 1.0])
    assert mean == pytest.approx(0.75)
    assert half == pytest.approx(1.96 * math.sqrt(0.75 / 3) / 2)  # Σ(v − 0.75)² = 0.75, n − 1 = 3, √n = 2
    assert mean_ci95([0.3]) == (pytest.approx(0.3), 0.0)


@pytest.mark.parametrize("interval", [mean_ci95, t_interval])
def test_an_interval_of_no_values_is_a_named_error(interval):
    with pytest.raises(ValueError, match="needs at least one value"):
        interval([])
