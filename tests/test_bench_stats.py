"""benchmarks/stats.py against hand-computed cases. t quantiles are the two-sided 95 % values of
a printed Student-t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), not scipy's output."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_stats():
    spec = importlib.util.spec_from_file_location("bench_stats", ROOT / "benchmarks" / "stats.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


stats = _load_stats()


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (8, 2.306), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="quantile level"):
        stats.t_quantile(1.0, 3)


def test_sample_std_uses_n_minus_one():
    # population std of these 8 values is exactly 2; the sample std is sqrt(32 / 7)
    assert stats.sample_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
    assert stats.sample_std([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert math.isnan(stats.sample_std([0.5]))
    with pytest.raises(ValueError, match="non-empty"):
        stats.sample_std([])


def test_mean_interval_of_one_two_three():
    ci = stats.mean_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / sqrt(n)
    assert (ci.n, ci.mean, ci.sd) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert ci.low == pytest.approx(2.0 - half, abs=1e-3) and ci.high == pytest.approx(2.0 + half, abs=1e-3)
    assert not ci.excludes_zero  # (-0.48, 4.48)


def test_interval_excludes_zero_on_either_side():
    up = stats.mean_interval([0.9, 1.0, 1.1])  # 1 ± 4.303 · 0.1 / sqrt(3) = (0.752, 1.248)
    assert up.low == pytest.approx(0.7516, abs=1e-3) and up.excludes_zero
    down = stats.mean_interval([-0.9, -1.0, -1.1])
    assert down.high == pytest.approx(-0.7516, abs=1e-3) and down.excludes_zero


def test_one_value_has_no_interval():
    ci = stats.mean_interval([0.3])
    assert ci.mean == 0.3 and math.isnan(ci.low) and math.isnan(ci.high) and not ci.excludes_zero


def test_paired_difference_pairs_by_key_and_ignores_unmatched():
    variant = {(0, 0): 3.0, (0, 1): 5.0, (1, 0): 8.0}
    full = {(1, 0): 5.0, (0, 1): 3.0, (0, 0): 2.0, (2, 2): 100.0}  # (2, 2) has no partner
    assert stats.paired_values(variant, full) == [((0, 0), 1.0), ((0, 1), 2.0), ((1, 0), 3.0)]
    d = stats.paired_difference(variant, full)
    assert (d.n, d.mean, d.sd) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert d.high == pytest.approx(2.0 + 4.303 / math.sqrt(3), abs=1e-3)


def test_paired_difference_removes_the_shared_seed_effect():
    # seeds move both runs by a lot; the variant is always 1 point worse: the paired interval is
    # tight and excludes 0, while the two unpaired spreads overlap widely
    full = {(0, 0): 80.0, (1, 0): 90.0, (2, 0): 70.0, (3, 0): 85.0}
    variant = {(0, 0): 79.0, (1, 0): 89.2, (2, 0): 68.8, (3, 0): 84.0}
    d = stats.paired_difference(variant, full)
    assert d.mean == pytest.approx(-1.0) and d.excludes_zero and d.high < 0
    assert stats.sample_std(list(full.values())) > 5


def test_paired_difference_without_common_keys_is_a_clear_error():
    with pytest.raises(ValueError, match="no matched keys"):
        stats.paired_difference({(0, 0): 1.0}, {(1, 1): 1.0})


def test_clustered_difference_averages_within_the_first_key():
    # differences per (pretraining seed, classifier seed): p0 -> 1, 3; p1 -> 2, 4; p2 -> 4, 4
    diffs = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 4.0, (2, 0): 4.0, (2, 1): 4.0}
    zeros = {k: 0.0 for k in diffs}
    ci = stats.clustered_paired_difference(diffs, zeros)  # cluster means 2, 3, 4
    assert (ci.n, ci.mean, ci.sd) == (3, pytest.approx(3.0), pytest.approx(1.0))
    assert ci.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    flat = stats.paired_difference(diffs, zeros)  # 6 values, df 5: narrower, as if independent
    assert flat.n == 6 and flat.half_width < ci.half_width
