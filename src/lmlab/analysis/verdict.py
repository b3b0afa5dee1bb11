"""Hypothesis checks judged from seed statistics: supported, refuted or inconclusive.

Each ``hypothesis.checks`` entry compares one arm's per-seed values of a metric with another
arm's (or with a fixed value). The rules, and why:

* A directional check (``<``, ``<=``, ``>``, ``>=``) claims ``arm - than`` lies on one side of
  ``margin``. It is *supported* only when the whole 95% Welch interval of the difference lies on
  the claimed side, *refuted* when the whole interval lies on the other side, and *inconclusive*
  otherwise. A significant p-value alone is not enough when a margin is set: the interval has to
  clear the margin.
* ``equivalent`` claims ``|arm - than| < margin``. Supported only when the 90% interval lies
  inside ±margin (two one-sided tests, :func:`lmlab.analysis.stats.equivalent`); refuted when
  the 95% interval lies entirely outside ±margin. "No difference" is never read off a
  non-significant test: absence of evidence is reported as inconclusive.
* ``==`` against a value, and any check of an event count against a value, is judged seed by
  seed ("0 divergence events in every seed"): those are exact observations of each run, so one
  seed is enough and no test is involved.
* With fewer than two seeds in a group there is no spread, so no interval and no test: the
  check is inconclusive ("n too small for a test") unless it is one of the exact per-seed kind.
  When every seed of both groups gave the same value (peak CUDA memory, parameter counts), the
  difference is exact and is judged as such.
* Two arms that ran the same configuration (an A/A comparison) differ only by seed noise: a
  directional check between them is never supported (nor refuted), however small the p-value;
  about one A/A test in twenty is "significant" by chance.

Every inconclusive check carries a power note: how many seeds per arm would settle it if the
observed difference and spreads were the true ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats as st

from lmlab.analysis.stats import seeds_needed, summarize, welch
from lmlab.analysis.summary import ArmSummary, Experiment, same_config
from lmlab.names import EVENT_METRICS
from lmlab.spec.schema import Check

Outcome = Literal["supported", "refuted", "inconclusive"]
ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class CheckResult:
    """The judgement of one check, with the numbers behind it.

    ``diff`` is mean(arm) minus the reference (the ``than`` arm's mean, or ``value``) and
    ``ci_low``/``ci_high`` its 95% interval; the claim is judged against ``margin``.
    """

    description: str
    metric: str
    arm: str
    op: str
    reference: str
    margin: float
    verdict: Outcome
    reason: str
    test: str
    n_arm: int
    n_ref: int | None
    mean_arm: float
    mean_ref: float
    diff: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci90_low: float | None = None
    ci90_high: float | None = None
    p: float | None = None
    power_note: str | None = None
    seeds_needed: int | None = None

    @property
    def too_small(self) -> bool:
        return self.test.startswith("n too small")


@dataclass(frozen=True)
class HypothesisVerdict:
    overall: Outcome
    reason: str
    checks: list[CheckResult]


def evaluate_check(check: Check, arm_values: Sequence[float],
                   ref_values: Sequence[float] | None = None, *,
                   same_configuration: bool = False) -> CheckResult:
    """Judge one check. ``ref_values`` are the ``than`` arm's per-seed values (None for a check
    against a fixed ``value``); ``same_configuration`` marks an A/A pair of arms."""
    a = [float(x) for x in arm_values]
    b = None if ref_values is None else [float(x) for x in ref_values]
    if check.than is not None and b is None:
        raise ValueError("a check with 'than' needs the other arm's values")
    if not all(math.isfinite(x) for x in a + (b or [])):
        # The summary layer keeps non-finite values out; a direct caller may not have.
        with np.errstate(invalid="ignore"):
            return _base(check, a, b, float(np.mean(b)) if b else float(check.value or 0.0),
                         verdict="inconclusive", test="not testable",
                         reason="cannot test: non-finite values (a diverged run?)")
    if check.than is None:
        return _against_value(check, a)
    assert b is not None
    if check.op == "equivalent" or (check.op == "==" and check.margin > 0):
        return _equivalence(check, a, b)
    if check.op == "==":
        return _exact_equality(check, a, b)
    return _directional(check, a, b, same_configuration)


def overall_verdict(results: Sequence[CheckResult]) -> tuple[Outcome, str]:
    """All supported -> supported; any refuted -> refuted; else inconclusive."""
    if not results:
        return "inconclusive", "the spec states no machine-checkable checks"
    refuted = [r for r in results if r.verdict == "refuted"]
    if refuted:
        return "refuted", f"{len(refuted)} of {len(results)} checks refuted"
    if all(r.verdict == "supported" for r in results):
        return "supported", f"all {len(results)} checks supported"
    open_ = sum(r.verdict == "inconclusive" for r in results)
    return "inconclusive", f"{open_} of {len(results)} checks inconclusive, none refuted"


def judge(checks: Sequence[Check], values: Callable[[str, str], list[float] | None],
          is_same_config: Callable[[str, str], bool]) -> HypothesisVerdict:
    """Judge every check. ``values(arm, metric)`` gives the included per-seed values (None for
    an arm the experiment does not have); ``is_same_config(a, b)`` detects A/A pairs."""
    results = []
    for check in checks:
        missing = [arm for arm in (check.arm, check.than) if arm and values(arm, check.metric) is None]
        if missing:
            results.append(_no_data(check, f"no arm named {', '.join(map(repr, missing))} "
                                           f"in this experiment"))
            continue
        a = values(check.arm, check.metric) or []
        b = values(check.than, check.metric) if check.than else None
        same = bool(check.than) and is_same_config(check.arm, check.than)  # type: ignore[arg-type]
        results.append(evaluate_check(check, a, b, same_configuration=same))
    outcome, reason = overall_verdict(results)
    return HypothesisVerdict(outcome, reason, results)


def judge_experiment(exp: Experiment, arms: Mapping[str, ArmSummary]) -> HypothesisVerdict:
    checks = exp.spec.hypothesis.checks if exp.spec else []

    def values(arm: str, metric: str) -> list[float] | None:
        return arms[arm].seeds_values(metric) if arm in arms else None

    return judge(checks, values, lambda x, y: same_config(exp, x, y))


# -- the cases -----------------------------------------------------------------------------------


def describe_check(check: Check) -> str:
    """A check as a reader needs it: its name (if any) and always the comparison itself."""
    formula = check.model_copy(update={"name": None}).describe()
    return f"{check.name} ({formula})" if check.name else formula


def _reference(check: Check) -> str:
    return check.than if check.than is not None else f"{check.value:g}"


def _base(check: Check, a: list[float], b: list[float] | None, ref_mean: float,
          **kw: object) -> CheckResult:
    mean_a = summarize(a).mean
    fields: dict[str, object] = {
        "description": describe_check(check), "metric": check.metric, "arm": check.arm,
        "op": check.op, "reference": _reference(check), "margin": check.margin,
        "n_arm": len(a), "n_ref": None if b is None else len(b), "mean_arm": mean_a,
        "mean_ref": ref_mean, "diff": mean_a - ref_mean,
    }
    fields.update(kw)
    return CheckResult(**fields)  # type: ignore[arg-type]


def _no_data(check: Check, why: str) -> CheckResult:
    nan = math.nan
    return CheckResult(describe_check(check), check.metric, check.arm, check.op, _reference(check),
                       check.margin, "inconclusive", why, "no data", 0, None, nan, nan, nan,
                       power_note="nothing to estimate a spread from: run the arm first")


def _holds(x: float, op: str, threshold: float, margin: float) -> bool:
    """Whether one value satisfies the claim ``x op threshold + margin`` (``==``: within
    ±margin of the threshold)."""
    if op == "==":
        return abs(x - threshold) <= margin
    bound = threshold + margin
    return {"<": x < bound, "<=": x <= bound, ">": x > bound, ">=": x >= bound}[op]


def _by_interval(op: str, lo: float, hi: float, margin: float) -> Outcome:
    """Directional rule on the 95% interval [lo, hi] of the difference."""
    below, above = hi < margin, lo > margin
    if op in ("<", "<="):
        return "supported" if below else "refuted" if above else "inconclusive"
    return "supported" if above else "refuted" if below else "inconclusive"


def _too_small(a: Sequence[float], b: Sequence[float] | None, check: Check) -> str:
    groups = [(check.arm, len(a))] + ([(check.than or "", len(b))] if b is not None else [])
    small = ", ".join(f"{n} seed{'s' if n != 1 else ''} in {arm}" for arm, n in groups if n < 2)
    return f"n too small for a test ({small})"


_SPREAD_UNKNOWN = ("spread unknown with fewer than 2 seeds: run at least 3 seeds per arm to "
                   "estimate it and test the difference")


def _against_value(check: Check, a: list[float]) -> CheckResult:
    if check.op == "equivalent":  # rejected by the schema; kept total for direct callers
        return _no_data(check, "'equivalent' compares two arms")
    value = float(check.value)  # type: ignore[arg-type]
    if not a:
        return _no_data(check, f"no seed of {check.arm} has a defined {check.metric}")
    if check.op == "==" or check.metric in EVENT_METRICS:
        ok = [_holds(x, check.op, value, check.margin) for x in a]
        verdict: Outcome = "supported" if all(ok) else "refuted"
        claim = (f"within ±{check.margin:g} of {value:g}" if check.op == "==" and check.margin
                 else f"equal to {value:g}" if check.op == "=="
                 else f"{check.op} {value + check.margin:g}")
        return _base(check, a, None, value, verdict=verdict,
                     reason=f"{sum(ok)} of {len(a)} seeds have {check.metric} {claim} "
                            f"(the claim is about every seed)",
                     test="per-seed check (exact per run, no test needed)")
    s = summarize(a)
    if s.n < 2:
        return _base(check, a, None, value, verdict="inconclusive",
                     reason="one seed gives no spread to judge a noisy metric by",
                     test=_too_small(a, None, check), power_note=_SPREAD_UNKNOWN)
    if s.std == 0:
        verdict = "supported" if _holds(s.mean, check.op, value, check.margin) else "refuted"
        return _base(check, a, None, value, verdict=verdict, ci_low=s.mean - value,
                     ci_high=s.mean - value, test="exact (every seed gave the same value)",
                     reason=f"every seed gave {s.mean:.6g}")
    lo, hi = s.ci_low - value, s.ci_high - value
    p = float(st.ttest_1samp(a, value + check.margin).pvalue)
    verdict = _by_interval(check.op, lo, hi, check.margin)
    result = _base(check, a, None, value, verdict=verdict, ci_low=lo, ci_high=hi, p=p,
                   test=f"one-sample t-test (n={s.n})",
                   reason=_interval_reason(verdict, check.op, check.margin))
    if verdict == "inconclusive":
        effect = s.mean - value - check.margin
        result = _with_power(result, effect, s.std, 0.0, _claim_sign(check.op))
    return result


def _directional(check: Check, a: list[float], b: list[float], same: bool) -> CheckResult:
    if not a or not b:
        side = check.arm if not a else check.than
        return _no_data(check, f"no seed of {side} has a defined {check.metric}")
    mean_b = summarize(b).mean
    w = welch(a, b)
    shifted = welch([x - check.margin for x in a], b)
    if w.testable:
        assert w.ci_low is not None and w.ci_high is not None
        verdict = _by_interval(check.op, w.ci_low, w.ci_high, check.margin)
        result = _base(check, a, b, mean_b, verdict=verdict, ci_low=w.ci_low,
                       ci_high=w.ci_high, p=shifted.p, test=f"Welch t-test (df={w.df:.1f})",
                       reason=_interval_reason(verdict, check.op, check.margin))
    elif len(a) < 2 or len(b) < 2:
        result = _base(check, a, b, mean_b, verdict="inconclusive",
                       reason="one seed gives no spread to judge a difference by",
                       test=_too_small(a, b, check), power_note=_SPREAD_UNKNOWN)
    elif w.reason == "no spread within either group":
        diff = w.diff
        verdict = "supported" if _holds(diff, check.op, 0.0, check.margin) else "refuted"
        result = _base(check, a, b, mean_b, verdict=verdict, ci_low=diff, ci_high=diff,
                       test="exact (every seed of both arms gave the same value)",
                       reason=f"the difference is exactly {diff:.6g}")
    else:
        result = _base(check, a, b, mean_b, verdict="inconclusive",
                       reason=f"cannot test: {w.reason}", test="not testable")
    if same:
        # The two arms are one configuration: a "significant" gap is a false positive by
        # construction, so neither direction can be claimed.
        alone = f" (the interval alone would have said {result.verdict})" \
            if result.verdict != "inconclusive" else ""
        return _replace(result, verdict="inconclusive", reason=(
            f"{check.arm} and {check.than} ran the same configuration (an A/A comparison): any "
            f"difference between them is seed noise, so no direction can be claimed{alone}"),
            power_note="same configuration: no number of seeds will show a real difference")
    if result.verdict == "inconclusive" and result.power_note is None:
        sd_a, sd_b = summarize(a).std, summarize(b).std
        result = _with_power(result, w.diff - check.margin, sd_a, sd_b, _claim_sign(check.op))
    return result


def _exact_equality(check: Check, a: list[float], b: list[float]) -> CheckResult:
    """``==`` between arms with no margin: exact for counts, otherwise only refutable."""
    if not a or not b:
        side = check.arm if not a else check.than
        return _no_data(check, f"no seed of {side} has a defined {check.metric}")
    mean_b = summarize(b).mean
    if len(set(a) | set(b)) == 1:
        return _base(check, a, b, mean_b, verdict="supported", ci_low=0.0, ci_high=0.0,
                     test="exact (every seed of both arms gave the same value)",
                     reason=f"every seed of both arms gave {a[0]:.6g}")
    w = welch(a, b)
    if w.testable and w.ci_low is not None and w.ci_high is not None and (
            w.ci_low > 0 or w.ci_high < 0):
        return _base(check, a, b, mean_b, verdict="refuted", ci_low=w.ci_low, ci_high=w.ci_high,
                     p=w.p, test=f"Welch t-test (df={w.df:.1f})",
                     reason="the 95% interval of the difference excludes 0")
    if not w.testable and w.reason == "no spread within either group":
        return _base(check, a, b, mean_b, verdict="refuted", ci_low=w.diff, ci_high=w.diff,
                     test="exact (every seed of both arms gave the same value)",
                     reason=f"the difference is exactly {w.diff:.6g}")
    return _base(check, a, b, mean_b, verdict="inconclusive", ci_low=w.ci_low, ci_high=w.ci_high,
                 p=w.p, test=f"Welch t-test (df={w.df:.1f})" if w.testable else
                 (_too_small(a, b, check) if min(len(a), len(b)) < 2 else "not testable"),
                 reason="exact equality of a noisy metric cannot be shown; "
                        "use op 'equivalent' with a margin",
                 power_note=None if w.testable else _SPREAD_UNKNOWN)


def _equivalence(check: Check, a: list[float], b: list[float]) -> CheckResult:
    margin = check.margin
    if not a or not b:
        side = check.arm if not a else check.than
        return _no_data(check, f"no seed of {side} has a defined {check.metric}")
    mean_b = summarize(b).mean
    w95 = welch(a, b)
    w90 = welch(a, b, confidence=1 - 2 * ALPHA)
    if not w95.testable:
        if len(a) < 2 or len(b) < 2:
            return _base(check, a, b, mean_b, verdict="inconclusive",
                         reason="equivalence needs an interval, and one seed gives none",
                         test=_too_small(a, b, check), power_note=_SPREAD_UNKNOWN)
        if w95.reason == "no spread within either group":
            d = w95.diff
            verdict: Outcome = "supported" if abs(d) < margin else "refuted"
            return _base(check, a, b, mean_b, verdict=verdict, ci_low=d, ci_high=d, ci90_low=d,
                         ci90_high=d, test="exact (every seed of both arms gave the same value)",
                         reason=f"the difference is exactly {d:.6g} (margin ±{margin:g})")
        return _base(check, a, b, mean_b, verdict="inconclusive",
                     reason=f"cannot test: {w95.reason}", test="not testable")
    assert None not in (w95.ci_low, w95.ci_high, w90.ci_low, w90.ci_high)
    lo95, hi95 = float(w95.ci_low), float(w95.ci_high)  # type: ignore[arg-type]
    lo90, hi90 = float(w90.ci_low), float(w90.ci_high)  # type: ignore[arg-type]
    if -margin < lo90 and hi90 < margin:
        verdict, reason = "supported", (
            f"the 90% interval [{lo90:.4g}, {hi90:.4g}] lies inside ±{margin:g} (TOST at 5%)")
    elif lo95 > margin or hi95 < -margin:
        verdict, reason = "refuted", (
            f"the 95% interval [{lo95:.4g}, {hi95:.4g}] lies entirely outside ±{margin:g}")
    else:
        verdict, reason = "inconclusive", (
            f"the 90% interval [{lo90:.4g}, {hi90:.4g}] is not inside ±{margin:g} and the 95% "
            f"interval is not outside it: neither equivalence nor a difference is shown")
    result = _base(check, a, b, mean_b, verdict=verdict, ci_low=lo95, ci_high=hi95,
                   ci90_low=lo90, ci90_high=hi90, p=_tost_p(a, b, margin),
                   test=f"TOST (two one-sided Welch tests, df={w95.df:.1f})", reason=reason)
    if verdict == "inconclusive":
        sd_a, sd_b = summarize(a).std, summarize(b).std
        gap = margin - abs(w95.diff)
        if gap > 0:
            # TOST at 5% per side needs about the power of a two-sided test at 10%.
            n = seeds_needed(gap, sd_a, sd_b, alpha=2 * ALPHA, power=POWER)
            note = (_seeds_text(n) + " per arm would show equivalence, if the observed "
                    f"difference ({w95.diff:.4g}) and spreads are the true ones (approximate "
                    "TOST power)")
        else:
            n = seeds_needed(-gap, sd_a, sd_b, alpha=ALPHA, power=POWER)
            note = (_seeds_text(n) + " per arm would show a difference beyond the margin, if the "
                    f"observed difference ({w95.diff:.4g}) and spreads are the true ones")
        result = _replace(result, power_note=note, seeds_needed=n)
    return result


def _tost_p(a: Sequence[float], b: Sequence[float], margin: float) -> float | None:
    """p-value of the two one-sided tests: the larger of P(diff <= -margin) and P(diff >=
    margin) under their nulls, each from a Welch t statistic on the shifted data."""
    lower = welch([x + margin for x in a], b)  # H0: diff <= -margin
    upper = welch([x - margin for x in a], b)  # H0: diff >= +margin
    if lower.t is None or upper.t is None or lower.df is None or upper.df is None:
        return None
    return float(max(st.t.sf(lower.t, lower.df), st.t.cdf(upper.t, upper.df)))


def _claim_sign(op: str) -> int:
    return -1 if op in ("<", "<=") else 1


def _interval_reason(verdict: Outcome, op: str, margin: float) -> str:
    side = "below" if op in ("<", "<=") else "above"
    other = "above" if side == "below" else "below"
    target = f"{margin:g}"
    if verdict == "supported":
        return f"the 95% interval of the difference lies entirely {side} {target}"
    if verdict == "refuted":
        return f"the 95% interval of the difference lies entirely {other} {target}"
    return f"the 95% interval of the difference straddles {target}"


def _with_power(result: CheckResult, effect: float, sd_a: float, sd_b: float,
                sign: int) -> CheckResult:
    """Attach the power note of an inconclusive directional check; ``effect`` is the observed
    difference minus the margin and ``sign`` the direction the claim needs."""
    if not all(math.isfinite(v) for v in (effect, sd_a, sd_b)):
        return _replace(result, power_note=_SPREAD_UNKNOWN)
    n = seeds_needed(effect, sd_a, sd_b, alpha=ALPHA, power=POWER)
    if effect == 0:
        note = ("the observed difference sits exactly on the threshold: no number of seeds is "
                "expected to settle it")
    elif effect * sign > 0:
        note = (_seeds_text(n) + " per arm would detect the observed difference "
                f"({effect:+.4g} beyond the margin) at 80% power, α=0.05, if it and the "
                "spreads are the true ones")
    else:
        note = ("the observed difference points against the prediction; "
                + _seeds_text(n) + " per arm would make it significant (refuting the check)")
    return _replace(result, power_note=note, seeds_needed=n)


def _seeds_text(n: int | None) -> str:
    return "more than a million seeds" if n is None else f"about {n} seed{'s' if n != 1 else ''}"


def _replace(result: CheckResult, **changes: object) -> CheckResult:
    return replace(result, **changes)  # type: ignore[arg-type]
