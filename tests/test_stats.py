"""Seed statistics against scipy, hand computations and textbook power tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from lmlab.analysis.stats import equivalent, seeds_needed, summarize, welch


def test_summarize_known_sample_by_hand() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sample variance (2.25+0.25+0.25+2.25)/3 = 5/3; t(0.975, 3) = 3.182446305...
    std = math.sqrt(5 / 3)
    half = 3.182446305284263 * std / 2
    assert s.n == 4 and s.mean == 2.5
    assert s.std == pytest.approx(std) and s.sem == pytest.approx(std / 2)
    assert (s.ci_low, s.ci_high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert s.ci_low == pytest.approx(0.44574, abs=1e-5)


def test_summarize_small_samples_have_no_spread() -> None:
    one = summarize([3.0])
    assert one.n == 1 and one.mean == 3.0
    assert all(math.isnan(v) for v in (one.std, one.sem, one.ci_low, one.ci_high))
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.mean)
    # A diverged seed is not silently dropped.
    assert math.isnan(summarize([1.0, float("nan")]).mean)


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(3.0, 0.1, size=3 + seed).tolist()
    b = rng.normal(3.05, 0.3, size=7 - seed).tolist()
    w = welch(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w.testable and w.reason is None
    assert (w.n_a, w.n_b) == (len(a), len(b))
    assert w.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert w.t == pytest.approx(ref.statistic)
    assert w.p == pytest.approx(ref.pvalue)
    assert w.df == pytest.approx(ref.df)
    assert (w.ci_low, w.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_welch_direction_and_significance() -> None:
    low = [3.00, 3.01, 2.99, 3.02, 3.00]
    high = [3.50, 3.52, 3.49, 3.51, 3.48]
    w = welch(low, high)
    assert w.diff == pytest.approx(3.004 - 3.5)
    assert w.p < 1e-6 and w.ci_high < 0
    assert welch(high, low).diff == pytest.approx(3.5 - 3.004)


@pytest.mark.parametrize(("a", "b", "reason"), [
    ([1.0], [1.0, 2.0], "at least 2"),
    ([1.0, 2.0], [], "at least 2"),
    ([1.0, 1.0], [2.0, 2.0], "no spread"),
    ([1.0, float("nan")], [1.0, 2.0], "non-finite"),
])
def test_welch_untestable_says_why(a: list[float], b: list[float], reason: str) -> None:
    w = welch(a, b)
    assert w.testable is False and reason in (w.reason or "")
    assert w.p is None and w.t is None and w.df is None
    assert w.ci_low is None and w.ci_high is None
    assert equivalent(a, b, margin=10.0) is None


def test_welch_untestable_still_reports_the_difference() -> None:
    assert welch([1.0], [3.0, 4.0]).diff == pytest.approx(-2.5)
    assert welch([1.0, 1.0], [2.0, 2.0]).diff == pytest.approx(-1.0)
    assert math.isnan(welch([], [1.0, 2.0]).diff)


def test_seeds_needed_textbook_values() -> None:
    # Two-sided two-sample t-test, alpha 0.05, power 0.8 (Cohen 1988; G*Power): d=1 -> 17,
    # d=0.8 -> 26, d=0.5 -> 64 per group. Welch with equal spreads and n has the same df.
    assert seeds_needed(1.0, 1.0, 1.0) == 17
    assert seeds_needed(0.8, 1.0, 1.0) == 26
    assert seeds_needed(0.5, 1.0, 1.0) == 64
    # Scale-free and sign-free: only |diff| relative to the spread matters.
    assert seeds_needed(-0.02, 0.02, 0.02) == 17


def test_seeds_needed_monotone() -> None:
    diffs = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    ns = [seeds_needed(d, 0.3, 0.5) for d in diffs]
    assert all(n is not None for n in ns)
    assert ns == sorted(ns, reverse=True) and ns[0] > ns[-1]
    assert seeds_needed(0.2, 0.3, 0.5, power=0.9) > seeds_needed(0.2, 0.3, 0.5)
    assert seeds_needed(0.2, 0.3, 0.5, alpha=0.01) > seeds_needed(0.2, 0.3, 0.5)
    assert seeds_needed(0.2, 0.6, 0.5) > seeds_needed(0.2, 0.3, 0.5)
    assert seeds_needed(10.0, 0.1, 0.1) == 2


def test_seeds_needed_power_by_simulation() -> None:
    # Independent of the noncentral-t algebra: at the returned n, simulated Welch tests on
    # normal data reject about 80% of the time, and one seed fewer falls short of it.
    diff, sd_a, sd_b = 0.3, 0.2, 0.4
    n = seeds_needed(diff, sd_a, sd_b)
    assert n is not None
    rng = np.random.default_rng(0)
    reps = 20_000

    def rejection_rate(k: int) -> float:
        a = rng.normal(diff, sd_a, size=(reps, k))
        b = rng.normal(0.0, sd_b, size=(reps, k))
        return float((st.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05).mean())

    assert rejection_rate(n) == pytest.approx(0.8, abs=0.025)
    assert rejection_rate(n) >= 0.78
    assert rejection_rate(n - 1) < rejection_rate(n)


@pytest.mark.parametrize(("diff", "sd_a", "sd_b"), [
    (0.0, 1.0, 1.0), (0.1, None, 1.0), (0.1, 1.0, float("nan")), (float("nan"), 1.0, 1.0),
    (0.1, 0.0, 0.0),
])
def test_seeds_needed_none_when_undefined(diff: float, sd_a: float | None,
                                          sd_b: float | None) -> None:
    assert seeds_needed(diff, sd_a, sd_b) is None


def test_seeds_needed_cap_and_bad_arguments() -> None:
    assert seeds_needed(1e-6, 1.0, 1.0, max_n=1000) is None
    with pytest.raises(ValueError):
        seeds_needed(0.1, 1.0, 1.0, power=1.0)
    with pytest.raises(ValueError):
        seeds_needed(0.1, -1.0, 1.0)


def test_equivalent_identical_and_shifted() -> None:
    rng = np.random.default_rng(1)
    tight = (3.0 + rng.normal(0, 0.001, size=8)).tolist()
    assert equivalent(tight, tight, margin=0.01) is True
    shifted = [x + 0.05 for x in tight]
    assert equivalent(tight, shifted, margin=0.01) is False
    # Wide, noisy samples with the same mean are not shown equivalent at a tight margin.
    noisy_a = rng.normal(3.0, 0.5, size=4).tolist()
    noisy_b = rng.normal(3.0, 0.5, size=4).tolist()
    assert equivalent(noisy_a, noisy_b, margin=0.01) is False
    with pytest.raises(ValueError):
        equivalent(tight, tight, margin=0.0)


@pytest.mark.parametrize("margin", [0.05, 0.1, 0.15, 0.2, 0.3])
def test_equivalent_is_two_one_sided_tests(margin: float) -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(3.00, 0.08, size=6)
    b = rng.normal(3.04, 0.12, size=5)
    # TOST: shifted by ±margin, both one-sided Welch tests must reject at alpha.
    p_lower = st.ttest_ind(a, b - margin, equal_var=False, alternative="greater").pvalue
    p_upper = st.ttest_ind(a, b + margin, equal_var=False, alternative="less").pvalue
    assert equivalent(a.tolist(), b.tolist(), margin) is bool(max(p_lower, p_upper) < 0.05)


def test_power_stays_finite_where_the_noncentral_tail_underflows() -> None:
    """scipy's noncentral t returns NaN for the far tail at few degrees of freedom and a large
    noncentrality; the power must still be the upper tail (and the seeds needed not skip n)."""
    from lmlab.analysis.stats import paired_seeds_needed, t_power

    assert t_power(0.0, 3, 0.05) == pytest.approx(0.05)
    power = t_power(8.4, 2, 0.05)
    assert math.isfinite(power) and power == pytest.approx(st.nct.sf(st.t.ppf(0.975, 2), 2, 8.4))
    # sd of the differences 0.06, difference 0.29: three seed pairs give ~97% power.
    assert paired_seeds_needed(-0.2906, 0.0599) == 3
