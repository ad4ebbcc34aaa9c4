"""The experiment report's statistics, checked against scipy and the standard library
called directly on the same known samples (and, for bootstrap, the same seed)."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

import numpy as np
import pytest
from scipy import stats

from control_server.experiment_stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Distribution,
    compare_paired,
    compare_unpaired,
    distribution,
    min_detectable_difference,
)

#: Final Dice of two arms' runs (made up, written out so a failure can be redone by hand).
ARM = [0.861, 0.874, 0.852, 0.889, 0.868, 0.871, 0.845, 0.880]
BASELINE = [0.842, 0.858, 0.850, 0.861, 0.839, 0.855, 0.847]
#: The same kind of values keyed by fold; fold 5 only in ARM_BY_FOLD, fold 6 only in the baseline.
ARM_BY_FOLD = {"0": 0.861, "1": 0.874, "2": 0.852, "3": 0.889, "4": 0.868, "5": 0.90}
BASELINE_BY_FOLD = {"0": 0.842, "1": 0.858, "2": 0.857, "3": 0.861, "4": 0.870, "6": 0.70}
SHARED_FOLDS = ["0", "1", "2", "3", "4"]


def _bootstrap_ci(data: tuple[list[float], ...], statistic: object, confidence: float) -> tuple:
    result = stats.bootstrap(
        data,
        statistic,
        n_resamples=BOOTSTRAP_RESAMPLES,
        vectorized=True,
        confidence_level=confidence,
        method="BCa",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return tuple(float(v) for v in result.confidence_interval)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


# --- distribution ------------------------------------------------------------------------


def test_distribution_equals_the_standard_library() -> None:
    d = distribution(ARM)
    assert d == Distribution(
        n=8,
        mean=statistics.mean(ARM),
        median=statistics.median(ARM),
        sd=statistics.stdev(ARM),
        min=0.845,
        max=0.889,
    )
    assert d.sd == pytest.approx(float(np.std(ARM, ddof=1)), rel=1e-12)


def test_distribution_of_nothing_is_all_unset() -> None:
    assert distribution([]) == Distribution(0, None, None, None, None, None)


def test_distribution_of_one_value_has_no_sd() -> None:
    assert distribution([0.8]) == Distribution(1, 0.8, 0.8, None, 0.8, 0.8)


def test_distribution_leaves_out_nan_and_infinity() -> None:
    d = distribution([0.8, math.nan, 0.6, math.inf])
    assert (d.n, d.mean, d.median, d.min, d.max) == (2, 0.7, 0.7, 0.6, 0.8)
    assert d.sd == pytest.approx(statistics.stdev([0.8, 0.6]))


# --- unpaired -----------------------------------------------------------------------------


def test_unpaired_numbers_are_scipys() -> None:
    c = compare_unpaired(ARM, BASELINE)
    u = stats.mannwhitneyu(ARM, BASELINE, alternative="two-sided")
    assert c.paired is False
    assert c.n == 7
    assert c.difference == pytest.approx(statistics.mean(ARM) - statistics.mean(BASELINE))
    assert (c.ci_low, c.ci_high) == _bootstrap_ci((ARM, BASELINE), _mean_difference, 0.95)
    assert c.p_value == float(u.pvalue)
    assert c.win_rate == float(u.statistic) / (8 * 7)
    assert c.method == (
        "unpaired: bootstrap BCa 95% CI of the difference of means (9999 resamples), Mann-Whitney U"
    )
    assert c.ci_low is not None and c.ci_high is not None
    assert c.ci_low < c.difference < c.ci_high


def test_unpaired_interval_follows_the_confidence() -> None:
    c90 = compare_unpaired(ARM, BASELINE, confidence=0.9)
    c99 = compare_unpaired(ARM, BASELINE, confidence=0.99)
    assert (c90.ci_low, c90.ci_high) == _bootstrap_ci((ARM, BASELINE), _mean_difference, 0.9)
    assert c99.ci_low < c90.ci_low and c90.ci_high < c99.ci_high  # type: ignore[operator]
    assert "99% CI" in c99.method


def test_unpaired_is_the_same_on_every_call() -> None:
    assert compare_unpaired(ARM, BASELINE) == compare_unpaired(ARM, BASELINE)


def test_unpaired_win_rate_counts_ties_half() -> None:
    # Pairs (a, b): 0.9 beats 0.5 and 0.7; 0.7 beats 0.5, ties 0.7; 0.5 ties 0.5, loses
    # to 0.7: (2 + 1.5 + 0.5) / 6.
    c = compare_unpaired([0.9, 0.7, 0.5], [0.5, 0.7])
    assert c.win_rate == pytest.approx(4 / 6)


def test_unpaired_constant_samples_fall_back_to_percentile() -> None:
    c = compare_unpaired([0.8, 0.8, 0.8], [0.7, 0.7, 0.7])
    percentile = stats.bootstrap(
        ([0.8, 0.8, 0.8], [0.7, 0.7, 0.7]),
        _mean_difference,
        n_resamples=BOOTSTRAP_RESAMPLES,
        vectorized=True,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    ).confidence_interval
    assert (c.ci_low, c.ci_high) == (float(percentile.low), float(percentile.high))
    assert c.ci_low == pytest.approx(0.1) and c.ci_high == pytest.approx(0.1)
    assert c.win_rate == 1.0
    assert "bootstrap percentile" in c.method


def test_unpaired_identical_samples_differ_by_nothing() -> None:
    c = compare_unpaired(BASELINE, BASELINE)
    assert c.difference == 0.0
    assert c.win_rate == 0.5
    assert c.p_value == float(stats.mannwhitneyu(BASELINE, BASELINE).pvalue) == 1.0
    assert c.ci_low is not None and c.ci_high is not None
    assert c.ci_low <= 0.0 <= c.ci_high


@pytest.mark.parametrize(
    ("arm", "baseline", "difference", "why"),
    [
        ([], [], None, "needs 2 runs per arm with a final Dice (arm 0, baseline 0)"),
        ([0.8, 0.9], [], None, "needs 2 runs per arm with a final Dice (arm 2, baseline 0)"),
        ([0.8], [0.7, 0.6], 0.15, "needs 2 runs per arm with a final Dice (arm 1, baseline 2)"),
        ([0.8, math.nan], [0.7, 0.6], 0.15, "(arm 1, baseline 2)"),
    ],
)
def test_unpaired_too_few_values_say_why(
    arm: list[float], baseline: list[float], difference: float | None, why: str
) -> None:
    c = compare_unpaired(arm, baseline)
    assert c.difference == (None if difference is None else pytest.approx(difference))
    assert (c.ci_low, c.ci_high, c.p_value, c.win_rate) == (None, None, None, None)
    assert why in c.method


def test_a_confidence_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), but got 95"):
        compare_unpaired(ARM, BASELINE, confidence=95)
    with pytest.raises(ValueError, match=r"but got 1\.0"):
        compare_paired(ARM_BY_FOLD, BASELINE_BY_FOLD, confidence=1.0)


# --- paired -------------------------------------------------------------------------------


def test_paired_numbers_are_scipys_on_the_shared_keys() -> None:
    c = compare_paired(ARM_BY_FOLD, BASELINE_BY_FOLD)
    diffs = [ARM_BY_FOLD[k] - BASELINE_BY_FOLD[k] for k in SHARED_FOLDS]
    assert c.paired is True
    assert c.n == 5
    assert c.difference == pytest.approx(statistics.mean(diffs))
    assert (c.ci_low, c.ci_high) == _bootstrap_ci((diffs,), np.mean, 0.95)
    assert c.p_value == float(stats.wilcoxon(diffs, alternative="two-sided").pvalue)
    # Folds 0, 1, 3 won, 2 lost, 4 lost.
    assert c.win_rate == 3 / 5
    assert c.method == (
        "paired: bootstrap BCa 95% CI of the mean difference (9999 resamples), Wilcoxon signed-rank"
    )


def test_paired_win_rate_counts_ties_half() -> None:
    c = compare_paired({"a": 0.9, "b": 0.5, "c": 0.6}, {"a": 0.8, "b": 0.5, "c": 0.7})
    assert c.win_rate == pytest.approx((1 + 0.5 + 0) / 3)
    assert c.p_value == float(stats.wilcoxon([0.1, 0.0, -0.1]).pvalue)


def test_paired_all_tied_has_p_one_and_says_so() -> None:
    c = compare_paired({"0": 0.8, "1": 0.7}, {"0": 0.8, "1": 0.7})
    assert (c.difference, c.ci_low, c.ci_high, c.p_value, c.win_rate) == (0.0, 0.0, 0.0, 1.0, 0.5)
    assert c.method.endswith("(all pairs tied: p = 1)")
    assert "bootstrap percentile" in c.method


def test_paired_constant_difference_falls_back_to_percentile() -> None:
    c = compare_paired({"0": 0.9, "1": 0.8, "2": 0.7}, {"0": 0.8, "1": 0.7, "2": 0.6})
    assert c.ci_low == pytest.approx(0.1) and c.ci_high == pytest.approx(0.1)
    assert c.win_rate == 1.0
    assert c.p_value == float(stats.wilcoxon([0.1, 0.1, 0.1]).pvalue)


@pytest.mark.parametrize(
    ("arm", "baseline", "n", "difference"),
    [
        ({}, {}, 0, None),
        ({"0": 0.9, "1": 0.8}, {"2": 0.7, "3": 0.6}, 0, None),
        ({"0": 0.9, "1": 0.8}, {"0": 0.7, "3": 0.6}, 1, 0.2),
        ({"0": 0.9, "1": 0.8}, {"0": 0.7, "1": math.nan}, 1, 0.2),
    ],
)
def test_paired_too_few_pairs_say_why(
    arm: dict[str, float], baseline: dict[str, float], n: int, difference: float | None
) -> None:
    c = compare_paired(arm, baseline)
    assert c.n == n
    assert c.difference == (None if difference is None else pytest.approx(difference))
    assert (c.ci_low, c.ci_high, c.p_value, c.win_rate) == (None, None, None, None)
    assert c.method == f"needs 2 pairs (got {n})"


# --- minimum detectable difference --------------------------------------------------------


def _t_test_power(difference: float, sd: float, n: int, paired: bool, alpha: float) -> float:
    """The exact power of the two-sided t test, from the noncentral t distribution."""
    df, se = (n - 1, sd / math.sqrt(n)) if paired else (2 * (n - 1), sd * math.sqrt(2 / n))
    critical = stats.t.ppf(1 - alpha / 2, df)
    nc = difference / se
    return float(stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc))


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("n", [10, 30, 100])
def test_min_detectable_difference_has_the_power_asked_for(paired: bool, n: int) -> None:
    mdd = min_detectable_difference(0.02, n, paired=paired)
    assert _t_test_power(mdd, 0.02, n, paired, 0.05) == pytest.approx(0.8, abs=0.01)


def test_min_detectable_difference_formula() -> None:
    # Unpaired, n = 20 per arm: df = 38, se = sd * sqrt(2 / 20).
    expected = (stats.t.ppf(0.975, 38) + stats.t.ppf(0.8, 38)) * 0.03 * math.sqrt(0.1)
    assert min_detectable_difference(0.03, 20, paired=False) == pytest.approx(expected)
    # Large n approaches the normal formula (1.96 + 0.84) * se.
    normal = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 0.03 / math.sqrt(10_000)
    assert min_detectable_difference(0.03, 10_000, paired=True) == pytest.approx(normal, rel=1e-3)
    assert min_detectable_difference(0.0, 5, paired=True) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sd": -0.1}, "sd must be a finite number >= 0, but got -0.1."),
        ({"sd": math.nan}, "sd must be a finite number >= 0, but got nan."),
        ({"n_per_arm": 1}, "n_per_arm must be at least 2, but got 1."),
        ({"alpha": 0.0}, "alpha must be in (0, 1), but got 0.0."),
        ({"power": 1.0}, "power must be in (0, 1), but got 1.0."),
    ],
)
def test_min_detectable_difference_refuses_bad_arguments(
    kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"sd": 0.02, "n_per_arm": 10, "paired": False, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        min_detectable_difference(**arguments)
