"""Seed statistics: summaries, Welch's t-test, power and equivalence.

Pure functions on lists of floats (one value per seed, e.g. final validation loss). They never
invent a number the data cannot support: with fewer than two seeds there is no spread, so no
interval, no test and no power estimate, and the result says so instead.

Non-finite values (a diverged run's loss) are not dropped here: they propagate into the mean,
and a test on them is marked untestable. Which runs belong in a comparison is the caller's call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with its spread and a t confidence interval (95% by default).

    ``std`` uses ddof=1; it, ``sem`` and the interval are NaN when n < 2.
    """

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    When ``testable`` is False, ``t``, ``df``, ``p`` and the interval are None and ``reason``
    says why; ``diff`` is still the observed difference (NaN if a group is empty).
    """

    diff: float
    ci_low: float | None
    ci_high: float | None
    t: float | None
    df: float | None
    p: float | None
    n_a: int
    n_b: int
    testable: bool
    reason: str | None = None


def summarize(xs: Sequence[float], confidence: float = 0.95) -> Summary:
    x = np.asarray(xs, dtype=float)
    n = int(x.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * sem
    return Summary(n, mean, std, sem, mean - half, mean + half)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    n_a, n_b = int(xa.size), int(xb.size)
    diff = float(xa.mean() - xb.mean()) if n_a and n_b else math.nan

    def untestable(reason: str) -> Welch:
        return Welch(diff, None, None, None, None, None, n_a, n_b, False, reason)

    if n_a < 2 or n_b < 2:
        return untestable(f"needs at least 2 values per group (have {n_a} and {n_b})")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        return untestable("non-finite values (a diverged run?)")
    var_a = float(xa.var(ddof=1)) / n_a
    var_b = float(xb.var(ddof=1)) / n_b
    se = math.sqrt(var_a + var_b)
    if se == 0.0:
        # Every seed gave the same value in both arms: the difference is exact, there is no
        # noise to test it against.
        return untestable("no spread within either group")
    df = _welch_df(var_a, var_b, n_a, n_b)
    t = diff / se
    p = float(2.0 * st.t.sf(abs(t), df))
    half = float(st.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(diff, diff - half, diff + half, t, df, p, n_a, n_b, True)


def seeds_needed(diff: float, sd_a: float | None, sd_b: float | None, alpha: float = 0.05,
                 power: float = 0.8, max_n: int = 1_000_000) -> int | None:
    """Seeds per arm for a two-sided Welch test at level ``alpha`` to detect a true difference
    ``diff`` with probability ``power``, given each arm's seed-to-seed standard deviation.

    Exact power from the noncentral t distribution (not the normal approximation, which is
    optimistic at the small n seed studies live at). None when there is nothing to detect
    (diff 0), the spreads are unknown or both zero, or more than ``max_n`` seeds would be needed.
    """
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    if sd_a is None or sd_b is None:
        return None
    if not all(math.isfinite(v) for v in (diff, sd_a, sd_b)) or diff == 0:
        return None
    if sd_a < 0 or sd_b < 0:
        raise ValueError(f"standard deviations cannot be negative: {sd_a}, {sd_b}")
    if sd_a == 0 and sd_b == 0:
        return None

    def achieved(n: int) -> float:
        var_a, var_b = sd_a**2 / n, sd_b**2 / n
        df = _welch_df(var_a, var_b, n, n)
        ncp = abs(diff) / math.sqrt(var_a + var_b)
        crit = st.t.ppf(1 - alpha / 2, df)
        return float(st.nct.sf(crit, df, ncp) + st.nct.cdf(-crit, df, ncp))

    # Power grows with n: double until enough, then bisect for the smallest n that is.
    lo, hi = 1, 2
    while achieved(hi) < power:
        if hi >= max_n:
            return None
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if achieved(mid) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def equivalent(a: Sequence[float], b: Sequence[float], margin: float,
               alpha: float = 0.05) -> bool | None:
    """Two one-sided tests (TOST): are the means within ±``margin`` of each other?

    True when the (1 - 2·alpha) Welch interval of the difference (90% by default) lies inside
    (-margin, margin); False when it does not (which means *not shown* equivalent, not shown
    different); None when the data cannot be tested (see :func:`welch`).
    """
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    w = welch(a, b, confidence=1 - 2 * alpha)
    if not w.testable:
        return None
    assert w.ci_low is not None and w.ci_high is not None
    return -margin < w.ci_low and w.ci_high < margin


def _welch_df(var_a: float, var_b: float, n_a: int, n_b: int) -> float:
    """Welch–Satterthwaite degrees of freedom from the two squared standard errors."""
    return (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
