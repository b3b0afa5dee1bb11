"""Hypothesis checks: the verdict rules against hand-made seed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.analysis.checks import evaluate_check
from lmlab.analysis.stats import seeds_needed, summarize, welch
from lmlab.analysis.verdict import judge, overall_verdict
from lmlab.spec.schema import Check

LOW = [4.80, 4.81, 4.79]
HIGH = [5.10, 5.12, 5.11]


def check(**kw: object) -> Check:
    fields: dict[str, object] = {"metric": "final_val_loss", "arm": "a"}
    fields.update(kw)
    return Check.model_validate(fields)


def test_clear_win_is_supported_with_its_interval() -> None:
    r = evaluate_check(check(op="<", than="b"), LOW, HIGH)
    w = welch(LOW, HIGH)
    assert r.verdict == "supported"
    assert r.diff == pytest.approx(4.80 - 5.11)
    assert (r.ci_low, r.ci_high) == (pytest.approx(w.ci_low), pytest.approx(w.ci_high))
    assert r.ci_high < 0 and r.p == pytest.approx(w.p) and r.p < 0.001
    assert r.test.startswith("Welch t-test") and r.power_note is None


def test_the_opposite_claim_is_refuted() -> None:
    r = evaluate_check(check(op=">", than="b"), LOW, HIGH)
    assert r.verdict == "refuted" and "entirely below" in r.reason


def test_a_margin_must_be_cleared_by_the_whole_interval() -> None:
    # a is better by 0.31 with a tight interval (about ±0.03).
    assert evaluate_check(check(op="<", than="b", margin=-0.2), LOW, HIGH).verdict == "supported"
    # Claiming an improvement of at least 0.5: the interval lies entirely above -0.5.
    r = evaluate_check(check(op="<", than="b", margin=-0.5), LOW, HIGH)
    assert r.verdict == "refuted"
    # The p-value is of the shifted hypothesis (difference = margin), not of difference = 0.
    assert r.p == pytest.approx(welch([x + 0.5 for x in LOW], HIGH).p)
    # An interval straddling the margin is inconclusive.
    assert evaluate_check(check(op="<", than="b", margin=-0.31), LOW, HIGH).verdict == \
        "inconclusive"


def test_identical_arms_are_never_supported() -> None:
    """Deterministic A/A: same config and seeds give the same numbers."""
    values = [5.02, 4.97, 5.05, 4.99, 5.01]
    for op in ("<", "<=", ">", ">="):
        r = evaluate_check(check(op=op, than="b"), values, values)
        assert r.verdict == "inconclusive", op
        assert r.diff == 0 and r.p == pytest.approx(1.0)
        assert r.power_note and "no number of seeds" in r.power_note


def test_a_a_false_positive_rate_is_the_nominal_one_and_zero_when_flagged() -> None:
    """Arms drawn from one distribution: a directional check is supported only by chance, at
    about alpha/2 per direction; when the arms are known to be one configuration, never."""
    rng = np.random.default_rng(1234)
    c = check(op="<", than="b")
    supported = flagged = 0
    trials = 400
    for _ in range(trials):
        a, b = rng.normal(5.0, 0.05, 5).tolist(), rng.normal(5.0, 0.05, 5).tolist()
        supported += evaluate_check(c, a, b).verdict == "supported"
        flagged += evaluate_check(c, a, b, same_configuration=True).verdict == "supported"
    assert supported / trials < 0.06  # nominal 0.025; binomial sd ~0.008
    assert flagged == 0


def test_a_a_pair_with_a_significant_fluke_is_still_inconclusive() -> None:
    a, b = [5.00, 5.01, 5.00], [5.10, 5.11, 5.10]  # "significant", yet the same configuration
    assert evaluate_check(check(op="<", than="b"), a, b).verdict == "supported"
    r = evaluate_check(check(op="<", than="b"), a, b, same_configuration=True)
    assert r.verdict == "inconclusive" and "A/A" in r.reason and "said supported" in r.reason


def test_n_one_is_too_small_for_a_test() -> None:
    r = evaluate_check(check(op="<", than="b"), [4.2], [5.1])
    assert r.verdict == "inconclusive"
    assert r.test.startswith("n too small for a test") and "1 seed in a" in r.test
    assert r.p is None and r.ci_low is None
    assert "spread unknown" in (r.power_note or "")
    # Also when only one side has a single seed.
    assert evaluate_check(check(op="<", than="b"), [4.2], HIGH).test.startswith("n too small")
    # A one-seed check of a noisy metric against a fixed value: no test either.
    r = evaluate_check(check(op="<", value=6.0), [4.2])
    assert r.verdict == "inconclusive" and r.too_small


def test_per_seed_checks_are_exact_even_with_one_seed() -> None:
    zero = check(metric="divergence_events", op="==", value=0)
    assert evaluate_check(zero, [0.0]).verdict == "supported"
    assert evaluate_check(zero, [0.0, 0.0, 0.0]).verdict == "supported"
    r = evaluate_check(zero, [0.0, 1.0, 0.0])
    assert r.verdict == "refuted" and r.reason.startswith("2 of 3 seeds")
    # Counts against a value are per seed whatever the operator.
    few = check(metric="spike_events", op="<=", value=2)
    assert evaluate_check(few, [1.0, 2.0]).verdict == "supported"
    assert evaluate_check(few, [1.0, 3.0]).verdict == "refuted"


def test_noisy_metric_against_a_value_uses_a_one_sample_interval() -> None:
    r = evaluate_check(check(op="<", value=5.5), LOW)
    s = summarize(LOW)
    assert r.verdict == "supported"
    assert (r.ci_low, r.ci_high) == (pytest.approx(s.ci_low - 5.5), pytest.approx(s.ci_high - 5.5))
    assert evaluate_check(check(op="<", value=4.0), LOW).verdict == "refuted"
    r = evaluate_check(check(op="<", value=4.805), LOW)
    assert r.verdict == "inconclusive" and r.seeds_needed is not None


def test_exact_difference_without_spread() -> None:
    # Peak CUDA memory is the same in every seed: the difference is exact, not estimated.
    small, big = [100.0, 100.0, 100.0], [160.0, 160.0, 160.0]
    r = evaluate_check(check(metric="peak_mem_bytes", op="<", than="b"), small, big)
    assert r.verdict == "supported" and r.test.startswith("exact")
    r = evaluate_check(check(metric="peak_mem_bytes", op="<", than="b", margin=-80), small, big)
    assert r.verdict == "refuted"


def test_equivalence_needs_the_90_interval_inside_the_margin() -> None:
    a, b = [5.00, 5.01, 4.99, 5.00], [5.01, 5.00, 5.00, 5.01]
    r = evaluate_check(check(op="equivalent", than="b", margin=0.05), a, b)
    w90 = welch(a, b, confidence=0.90)
    assert r.verdict == "supported"
    assert (r.ci90_low, r.ci90_high) == (pytest.approx(w90.ci_low), pytest.approx(w90.ci_high))
    assert r.p is not None and r.p < 0.05  # the TOST p-value
    # A real, large difference: the 95% interval lies outside the margin.
    assert evaluate_check(check(op="equivalent", than="b", margin=0.05), LOW, HIGH).verdict == \
        "refuted"


def test_no_difference_is_never_read_off_a_non_significant_test() -> None:
    """Noisy arms with nearly equal means: the t-test is far from significant, but the interval
    is wider than the margin, so equivalence is NOT shown."""
    a, b = [4.9, 5.3, 5.0, 5.2], [5.1, 4.8, 5.3, 5.0]
    w = welch(a, b)
    assert w.p > 0.5
    r = evaluate_check(check(op="equivalent", than="b", margin=0.05), a, b)
    assert r.verdict == "inconclusive"
    gap = 0.05 - abs(w.diff)
    assert r.seeds_needed == seeds_needed(gap, summarize(a).std, summarize(b).std, alpha=0.10)
    assert r.power_note and "would show equivalence" in r.power_note


def test_power_note_of_an_inconclusive_directional_check() -> None:
    a, b = [5.00, 5.06, 4.97], [5.05, 5.02, 5.09]
    r = evaluate_check(check(op="<", than="b"), a, b)
    assert r.verdict == "inconclusive"
    expected = seeds_needed(r.diff, summarize(a).std, summarize(b).std)
    assert expected is not None and expected > 3
    assert r.seeds_needed == expected and f"about {expected} seeds" in (r.power_note or "")
    # The same data judged against the opposite claim: the note says the data points against it.
    r = evaluate_check(check(op=">", than="b"), a, b)
    assert "points against the prediction" in (r.power_note or "")


def test_non_finite_values_are_not_tested() -> None:
    r = evaluate_check(check(op="<", than="b"), [4.8, math.inf, 4.9], HIGH)
    assert r.verdict == "inconclusive" and "non-finite" in r.reason


def test_overall_verdict_and_judge() -> None:
    win = check(op="<", than="b")
    stable = check(metric="divergence_events", op="==", value=0)
    data = {("a", "final_val_loss"): LOW, ("b", "final_val_loss"): HIGH,
            ("a", "divergence_events"): [0.0, 0.0, 0.0]}

    def values(arm: str, c: Check) -> list[tuple[int, float]] | None:
        found = data.get((arm, c.metric or ""), [] if arm in ("a", "b") else None)
        return None if found is None else list(enumerate(found))

    v = judge([win, stable], values, lambda x, y: False)
    assert v.overall == "supported" and [c.verdict for c in v.checks] == ["supported"] * 2
    v = judge([win, check(op=">", than="b")], values, lambda x, y: False)
    assert v.overall == "refuted"
    v = judge([win, check(op="<", than="nope")], values, lambda x, y: False)
    assert v.overall == "inconclusive" and "no arm named 'nope'" in v.checks[1].reason
    assert overall_verdict([])[0] == "inconclusive"
