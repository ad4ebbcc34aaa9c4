"""The statistics of an experiment report: samples summarised, arms compared to the baseline.

Pure functions of the numbers they are handed (final Dice values, or any other
outcome): no store, no clock, no proto. Every interval and p-value comes from
scipy, called with a fixed seed, so the same runs give the same report on every
call and every replica, and a test can check each number against scipy itself.

scipy.stats is imported on first use: it takes most of a second to import,
which every server and decider start would otherwise pay for a report that few
of them serve.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "Comparison",
    "Distribution",
    "compare_paired",
    "compare_unpaired",
    "distribution",
    "min_detectable_difference",
]

#: The bootstrap's seed: fixed, so an interval does not move between two calls.
BOOTSTRAP_SEED = 20260101
#: The bootstrap's resamples (scipy's default).
BOOTSTRAP_RESAMPLES = 9999

_FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Distribution:
    """A sample summarised; every field None when it is empty, `sd` (ddof=1) also with one value."""

    n: int
    mean: float | None
    median: float | None
    sd: float | None
    min: float | None
    max: float | None


@dataclass(frozen=True)
class Comparison:
    """An arm's outcome against the baseline arm's (the proto's ArmComparison).

    `n` is the number of pairs (paired) or the smaller of the two sample sizes
    (unpaired). A number is None when the samples are too small for it, and
    `method` then says why.
    """

    paired: bool
    n: int
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    win_rate: float | None
    method: str


def distribution(values: Sequence[float]) -> Distribution:
    """Count, mean, median, sample sd, min and max of the finite `values`.

    NaN and infinities are left out (and not counted in `n`): a run whose final
    Dice is not a number has no outcome to summarise, and one such value would
    turn every statistic into NaN.
    """
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return Distribution(n=0, mean=None, median=None, sd=None, min=None, max=None)
    return Distribution(
        n=len(finite),
        mean=statistics.fmean(finite),
        median=statistics.median(finite),
        sd=statistics.stdev(finite) if len(finite) >= 2 else None,
        min=min(finite),
        max=max(finite),
    )


def compare_unpaired(
    arm: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> Comparison:
    """The arm's mean minus the baseline's, with a two-sample bootstrap interval
    (BCa, or percentile where BCa cannot be computed), the two-sided Mann-Whitney U
    p-value and P(arm > baseline) = U / (n_arm * n_baseline), ties counting half.

    The difference needs one value per side; the interval, p and win rate two.
    """
    _check_confidence(confidence)
    x, y = _finite(arm), _finite(baseline)
    n = min(len(x), len(y))
    difference = float(np.mean(x) - np.mean(y)) if n >= 1 else None
    if n < 2:
        return _too_few(
            paired=False,
            n=n,
            difference=difference,
            why=f"needs 2 runs per arm with a final Dice (arm {len(x)}, baseline {len(y)})",
        )
    degenerate = bool(np.ptp(x) == 0 and np.ptp(y) == 0)
    (low, high), how = _bootstrap((x, y), _mean_difference, confidence, degenerate)
    test = _scipy_stats().mannwhitneyu(x, y, alternative="two-sided")
    return Comparison(
        paired=False,
        n=n,
        difference=difference,
        ci_low=low,
        ci_high=high,
        p_value=float(test.pvalue),
        win_rate=float(test.statistic) / (len(x) * len(y)),
        method=(
            f"unpaired: bootstrap {how} {_percent(confidence)} CI of the difference of means "
            f"({BOOTSTRAP_RESAMPLES} resamples), Mann-Whitney U"
        ),
    )


def compare_paired(
    arm: Mapping[str, float], baseline: Mapping[str, float], confidence: float = 0.95
) -> Comparison:
    """Paired by key (the keys both sides have, with finite values): the mean of the
    differences arm - baseline, a one-sample bootstrap interval of that mean (BCa, or
    percentile where BCa cannot be computed), the two-sided Wilcoxon signed-rank
    p-value and the share of pairs the arm won, ties counting half.

    When every difference is zero the Wilcoxon test has nothing to rank (scipy
    answers p = 1 with a warning); p is then 1.0 and `method` says so.
    """
    _check_confidence(confidence)
    keys = sorted(
        k
        for k in arm.keys() & baseline.keys()
        if math.isfinite(arm[k]) and math.isfinite(baseline[k])
    )
    diffs = np.array([arm[k] - baseline[k] for k in keys], dtype=np.float64)
    n = len(keys)
    difference = float(np.mean(diffs)) if n >= 1 else None
    if n < 2:
        return _too_few(paired=True, n=n, difference=difference, why=f"needs 2 pairs (got {n})")
    degenerate = bool(np.ptp(diffs) == 0)
    (low, high), how = _bootstrap((diffs,), _mean, confidence, degenerate)
    wins = float(np.sum(diffs > 0) + 0.5 * np.sum(diffs == 0)) / n
    method = (
        f"paired: bootstrap {how} {_percent(confidence)} CI of the mean difference "
        f"({BOOTSTRAP_RESAMPLES} resamples), Wilcoxon signed-rank"
    )
    if not np.any(diffs):
        return Comparison(
            True, n, difference, low, high, 1.0, wins, method + " (all pairs tied: p = 1)"
        )
    p_value = float(_scipy_stats().wilcoxon(diffs, alternative="two-sided").pvalue)
    return Comparison(True, n, difference, low, high, p_value, wins, method)


def min_detectable_difference(
    sd: float, n_per_arm: int, paired: bool, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference of means a two-sided t test at level `alpha` finds
    with probability `power`, by the usual t approximation:

        MDD = (t(1 - alpha/2; df) + t(power; df)) * se

    unpaired: `sd` is the per-arm outcome sd, se = sd * sqrt(2 / n), df = 2 (n - 1);
    paired: `sd` is the sd of the pairs' differences, se = sd / sqrt(n), df = n - 1.
    The rank tests the report uses are about 95% as efficient as the t test on
    normal data, so read it as a slight underestimate for them.
    """
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite number >= 0, but got {sd}.")
    if n_per_arm < 2:
        raise ValueError(f"n_per_arm must be at least 2, but got {n_per_arm}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), but got {alpha}.")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), but got {power}.")
    t = _scipy_stats().t
    if paired:
        df, se = n_per_arm - 1, sd / math.sqrt(n_per_arm)
    else:
        df, se = 2 * (n_per_arm - 1), sd * math.sqrt(2 / n_per_arm)
    return float((t.ppf(1 - alpha / 2, df) + t.ppf(power, df)) * se)


# --- helpers ------------------------------------------------------------------------------


def _scipy_stats() -> Any:
    from scipy import stats  # type: ignore[import-untyped]

    return stats


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), but got {confidence}.")


def _finite(values: Sequence[float]) -> _FloatArray:
    return np.array([v for v in values if math.isfinite(v)], dtype=np.float64)


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def _mean(x: _FloatArray, axis: int = -1) -> Any:
    return np.mean(x, axis=axis)


def _mean_difference(x: _FloatArray, y: _FloatArray, axis: int = -1) -> Any:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _bootstrap(
    data: tuple[_FloatArray, ...], statistic: Any, confidence: float, degenerate: bool
) -> tuple[tuple[float | None, float | None], str]:
    """The interval and the method that gave it: BCa, unless the samples are constant
    (its acceleration divides by zero) or it still comes out NaN, then percentile.
    None for both ends when neither gives a finite interval."""
    methods = ("percentile",) if degenerate else ("BCa", "percentile")
    for method in methods:
        result = _scipy_stats().bootstrap(
            data,
            statistic,
            n_resamples=BOOTSTRAP_RESAMPLES,
            vectorized=True,
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
        low, high = (float(v) for v in result.confidence_interval)
        if math.isfinite(low) and math.isfinite(high):
            return (low, high), method
    return (None, None), "(no finite interval)"


def _too_few(paired: bool, n: int, difference: float | None, why: str) -> Comparison:
    return Comparison(
        paired=paired,
        n=n,
        difference=difference,
        ci_low=None,
        ci_high=None,
        p_value=None,
        win_rate=None,
        method=why,
    )
