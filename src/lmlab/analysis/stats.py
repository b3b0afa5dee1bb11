"""Seed statistics: summaries, Welch's and the paired t-test, power, equivalence, the
probability of improvement and the Holm-Bonferroni adjustment.

Pure functions on lists of floats (one value per seed, e.g. final validation loss), or of
``(seed, value)`` where seeds are matched. They never invent a number the data cannot support:
with fewer than two seeds there is no spread, so no interval, no test and no power estimate, and
the result says so instead.

Non-finite values (a diverged run's loss) are not dropped here: they propagate into the mean,
and a test on them is marked untestable. Which runs belong in a comparison is the caller's call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special


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
    says why; ``diff`` is still the observed difference (NaN if a group is empty). ``se``: the
    standard error of the difference.
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
    se: float | None = None

    @property
    def name(self) -> str:
        return f"Welch t-test (df={self.df:.1f})" if self.df is not None else "Welch t-test"


@dataclass(frozen=True)
class Paired:
    """The paired t-test of mean(a - b) over matched seeds: seed s of one arm against seed s of
    the other (common random numbers), so the noise the two share cancels in the difference.

    ``pairs`` are (seed, a, b) for the seeds both have, ``sd`` the standard deviation of the
    per-seed differences and ``se`` = sd / sqrt(n). Untestable like :class:`Welch`.
    """

    diff: float
    ci_low: float | None
    ci_high: float | None
    t: float | None
    df: float | None
    p: float | None
    n: int
    sd: float | None
    pairs: tuple[tuple[int, float, float], ...]
    testable: bool
    reason: str | None = None
    se: float | None = None

    @property
    def name(self) -> str:
        return f"paired t-test ({self.n} seed pairs, df={self.n - 1})"

    @property
    def differences(self) -> list[float]:
        return [a - b for _, a, b in self.pairs]


# One comparison of two arms, whichever test the design calls for.
Difference = Welch | Paired


@dataclass(frozen=True)
class Improvement:
    """P(a seed of one arm beats a seed of the other), as rliable computes it: over every pair
    of seeds, one from each arm, the share where the arm is better, ties counting one half (the
    Mann-Whitney U statistic over n_a x n_b). ``ci_low``/``ci_high``: a 95% percentile bootstrap
    interval (seeds resampled within each arm, or as matched pairs when paired). When paired,
    ``wins`` of the ``n`` matched seeds (seed s against seed s, ties one half)."""

    p: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    wins: float | None = None
    n: int | None = None


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
    half = _t_quantile(0.5 + confidence / 2, n - 1) * sem
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
    p = 2.0 * _t_sf(abs(t), df)
    half = _t_quantile(0.5 + confidence / 2, df) * se
    return Welch(diff, diff - half, diff + half, t, df, p, n_a, n_b, True, se=se)


def paired(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]],
           confidence: float = 0.95) -> Paired:
    """The paired t-test of ``a`` minus ``b`` (each ``(seed, value)``) over the seeds both
    have."""
    other = dict(b)
    pairs = tuple((s, float(x), float(other[s])) for s, x in sorted(a) if s in other)
    # Plain Python: a handful of seeds, computed thousands of times by the calibration tests.
    d = [x - y for _, x, y in pairs]
    n = len(d)
    finite = all(math.isfinite(x) for x in d)
    diff = sum(d) / n if n and finite else (math.nan if not n else float(np.mean(d)))

    def untestable(reason: str, sd: float | None = None) -> Paired:
        return Paired(diff, None, None, None, None, None, n, sd, pairs, False, reason)

    if n < 2:
        return untestable(f"needs at least 2 seeds that both arms ran (have {n})")
    if not finite:
        return untestable("non-finite values (a diverged run?)")
    sd = math.sqrt(sum((x - diff) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        # Every seed differs by the same amount: the difference is exact, with no noise left.
        return untestable("no spread in the per-seed differences", sd)
    se = sd / math.sqrt(n)
    t = diff / se
    p = 2.0 * _t_sf(abs(t), n - 1)
    half = _t_quantile(0.5 + confidence / 2, n - 1) * se
    return Paired(diff, diff - half, diff + half, t, float(n - 1), p, n, sd, pairs, True, se=se)


def one_sided_p(d: Difference, margin: float, above: bool) -> float | None:
    """p of the one-sided test that the true difference lies ``above`` ``margin`` (or below it),
    against the null that it sits at ``margin``, from the test's own t distribution."""
    if not d.testable or d.se is None or d.df is None:
        return None
    t = (d.diff - margin) / d.se
    return _t_sf(t, d.df) if above else _t_sf(-t, d.df)


def interval(d: Difference, confidence: float) -> tuple[float, float] | None:
    """The difference's two-sided interval at ``confidence``."""
    if not d.testable or d.se is None or d.df is None:
        return None
    half = _t_quantile(0.5 + confidence / 2, d.df) * d.se
    return d.diff - half, d.diff + half


# The Student t tail and quantile through scipy.special (the same functions scipy.stats.t
# calls, without its per-call overhead: the calibration simulations call them thousands of
# times).
def _t_sf(t: float, df: float) -> float:
    return float(special.stdtr(df, -t))


def _t_quantile(q: float, df: float) -> float:
    return float(special.stdtrit(df, q))


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
        return t_power(abs(diff) / math.sqrt(var_a + var_b), _welch_df(var_a, var_b, n, n),
                       alpha)

    return _smallest_n(achieved, power, max_n)


def paired_seeds_needed(diff: float, sd_diff: float | None, alpha: float = 0.05,
                        power: float = 0.8, max_n: int = 1_000_000) -> int | None:
    """Seed pairs (seeds per arm, every arm running the same seeds) for a two-sided paired
    t-test at level ``alpha`` to detect a true mean difference ``diff`` with probability
    ``power``, given the standard deviation of the per-seed differences ``sd_diff``: the
    noncentral t with n - 1 degrees of freedom and noncentrality |diff| sqrt(n) / sd_diff.
    None as for :func:`seeds_needed`."""
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    if sd_diff is None or not all(math.isfinite(v) for v in (diff, sd_diff)) or diff == 0:
        return None
    if sd_diff < 0:
        raise ValueError(f"a standard deviation cannot be negative: {sd_diff}")
    if sd_diff == 0:
        return None
    return _smallest_n(lambda n: t_power(abs(diff) * math.sqrt(n) / sd_diff, n - 1, alpha),
                       power, max_n)


def t_power(ncp: float, df: float, alpha: float) -> float:
    """Power of a two-sided t-test at level ``alpha`` with noncentrality ``ncp`` (>= 0)."""
    crit = _t_quantile(1 - alpha / 2, df)
    upper = 1.0 - float(special.nctdtr(df, ncp, crit))
    # The far tail: scipy returns NaN for it at few degrees of freedom and a large ncp, where
    # it is below 1e-10 (it is at most the central tail, alpha / 2, at ncp = 0).
    lower = float(special.nctdtr(df, ncp, -crit))
    return upper + (lower if math.isfinite(lower) else 0.0)


def _smallest_n(achieved: Callable[[int], float], power: float, max_n: int) -> int | None:
    """The smallest n >= 2 with ``achieved(n) >= power`` (power grows with n): double until
    enough, then bisect. None beyond ``max_n``."""
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


def prob_improvement(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]], *,
                     lower_is_better: bool, paired_seeds: bool, n_boot: int = 2000,
                     seed: int = 0) -> Improvement | None:
    """P(a seed of ``a`` beats a seed of ``b``) with a bootstrap interval (a fixed RNG: the same
    data give the same interval). ``a`` and ``b`` are ``(seed, value)``; ``paired_seeds``
    resamples matched seeds together (the seeds both arms ran). None without data."""
    av = np.array([v for _, v in a], dtype=float)
    bv = np.array([v for _, v in b], dtype=float)
    if not av.size or not bv.size or not (np.isfinite(av).all() and np.isfinite(bv).all()):
        return None
    sign = -1.0 if lower_is_better else 1.0

    def share(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # x: (..., n_a), y: (..., n_b) -> the share of (i, j) with x_i better than y_j.
        gap = sign * (x[..., :, None] - y[..., None, :])
        return ((gap > 0) + 0.5 * (gap == 0)).mean(axis=(-2, -1))

    p = float(share(av, bv))
    rng = np.random.default_rng(seed)
    wins = n = None
    if paired_seeds:
        other = dict(b)
        pa = np.array([v for s, v in sorted(a) if s in other], dtype=float)
        pb = np.array([other[s] for s, _ in sorted(a) if s in other], dtype=float)
        n = int(pa.size)
        if n:
            gap = sign * (pa - pb)
            wins = float((gap > 0).sum() + 0.5 * (gap == 0).sum())
            idx = rng.integers(0, n, size=(n_boot, n))
            boot = share(pa[idx], pb[idx])
        else:
            boot = np.array([p])
    else:
        boot = share(av[rng.integers(0, av.size, size=(n_boot, av.size))],
                     bv[rng.integers(0, bv.size, size=(n_boot, bv.size))])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return Improvement(p, float(lo), float(hi), int(av.size), int(bv.size), wins, n)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries are not tests and stay None): the i-th
    smallest of m is multiplied by m - i + 1, made monotone, capped at 1. Rejecting every
    adjusted p <= alpha keeps the family-wise error rate at alpha for any dependence."""
    tests = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tests)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tests):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


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
