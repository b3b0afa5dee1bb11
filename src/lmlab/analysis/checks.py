"""One check judged from per-seed values: supported, refuted or inconclusive, at a stated level.

A check compares one arm's per-seed values of a quantity (a per-run metric, or a statistic of a
logged curve) with another arm's, or with a fixed value. The rules, and why:

* Directional (``<``, ``<=``, ``>``, ``>=``): ``arm - than`` lies on one side of ``margin``.
  Tested two-sided against "the difference is ``margin``": when p reaches the check's level
  (the whole decision interval lies on one side of the margin) it is *supported* if that is the
  claimed side and *refuted* if not; otherwise *inconclusive*. At a fixed design with one check
  the level is 5% and the decision interval the 95% one; with several checks (Holm) or at an
  early look it is stricter (:class:`lmlab.analysis.sequential.Level`).
* Seed-matched arms (seed s of both drew the same random numbers) are compared on the per-seed
  differences (paired t), others with Welch's test; which one is decided from the design
  (:func:`lmlab.analysis.verdict.pairing`), never from the data.
* ``equivalent``: ``|arm - than| < margin``, supported only when both one-sided tests of TOST
  reject, refuted when the difference is shown beyond the margin. "No difference" is never read
  off a non-significant test.
* ``==`` against a value, and an event count against a value, are judged seed by seed ("0
  divergence events in every seed"): exact observations, so one seed is enough and no test.
* Fewer than two seeds (or seed pairs): no spread, no test, inconclusive ("n too small") unless
  exact per seed. No spread at all (peak CUDA memory, parameter counts): the difference is exact.
* Two arms of one configuration (A/A) differ only by seed noise: a directional check between
  them is never supported nor refuted, however small the p-value.

Results carry rliable's probability of improvement and, when inconclusive, a power note: the
seeds per arm that would settle the check if the observed difference and spreads were true.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lmlab.analysis.sequential import Level
from lmlab.analysis.stats import (
    Difference,
    Improvement,
    Paired,
    interval,
    one_sided_p,
    paired,
    paired_seeds_needed,
    prob_improvement,
    seeds_needed,
    summarize,
    welch,
)
from lmlab.names import RUN_METRICS
from lmlab.spec.schema import Check

Outcome = Literal["supported", "refuted", "inconclusive"]
POWER = 0.8
# (seed, value) of one arm's included runs; plain values are numbered 0, 1, ...
Values = Sequence[tuple[int, float]] | Sequence[float]


@dataclass(frozen=True)
class CheckResult:
    """The judgement of one check, with the numbers behind it.

    ``diff`` is mean(arm) minus the reference (the ``than`` arm's mean, or ``value``; paired:
    the mean per-seed difference) and ``ci_low``/``ci_high`` its interval at the display
    confidence (95% at alpha 0.05). ``p`` is the decision test's p-value and ``threshold`` the
    p it had to reach; ``decision_low``/``decision_high`` the interval at that level.
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
    analysis: str = "none"  # paired | welch | one-sample | per-seed | exact | none
    threshold: float | None = None
    decision_low: float | None = None
    decision_high: float | None = None
    pairs: tuple[tuple[int, float, float], ...] = ()
    sd_diff: float | None = None  # paired: the spread of the per-seed differences
    improvement: Improvement | None = None
    # For a paired check, what Welch's test would have said (reference only: never the verdict).
    welch_ci: tuple[float, float] | None = None
    welch_seeds_needed: int | None = None
    same_configuration: bool = False
    tested: bool = False  # the verdict rests on a test (a member of the Holm family)
    # Set by lmlab.analysis.verdict for the experiment as a whole:
    p_adjusted: float | None = None  # Holm-adjusted p (fixed designs)
    level_note: str | None = None  # why ``threshold`` is what it is
    look: int | None = None  # the look the verdict was reached at (until-settled)
    pairing_reason: str | None = None

    @property
    def too_small(self) -> bool:
        return self.test.startswith("n too small")

    @property
    def settled(self) -> bool:
        return self.verdict != "inconclusive"


def is_test(check: Check) -> bool:
    """Whether a check's verdict rests on a statistical test (and so takes a share of the
    family-wise alpha): every check except the exact per-seed kind, decided before any data."""
    return not (check.than is None and (check.op == "==" or check.counts_events))


def evaluate_check(check: Check, arm_values: Values, ref_values: Values | None = None, *,
                   paired_seeds: bool = False, same_configuration: bool = False,
                   alpha: float = 0.05, level: Level | None = None,
                   notes: bool = True) -> CheckResult:
    """Judge one check. ``ref_values`` are the ``than`` arm's per-seed values (None for a check
    against a fixed ``value``); ``paired_seeds``: compare seed s with seed s (the design shares
    random numbers); ``same_configuration`` marks an A/A pair; ``alpha`` is the family-wise
    level (the display confidence is 1 - alpha) and ``level`` this check's test level (default:
    ``alpha`` itself, a fixed design with one check). ``notes``: add the power note and the
    probability of improvement (the sequential procedure leaves them to the final look)."""
    a = _pairs(arm_values)
    b = None if ref_values is None else _pairs(ref_values)
    level = level or Level(alpha)
    if check.than is not None and b is None:
        raise ValueError("a check with 'than' needs the other arm's values")
    ctx = _Ctx(check, a, b, alpha, level, notes, is_test(check))
    if not all(math.isfinite(v) for _, v in a + (b or [])):
        # The summary layer keeps non-finite values out; a direct caller may not have.
        return ctx.base(verdict="inconclusive", test="not testable",
                        reason="cannot test: non-finite values (a diverged run?)")
    if not a or (b is not None and not b):
        return ctx.no_data(f"no seed of {check.arm if not a else check.than} has a defined "
                           f"{check.measure}")
    if check.than is None:
        result = _against_value(ctx)
    elif check.op == "equivalent" or (check.op == "==" and check.margin > 0):
        result = _equivalence(ctx, paired_seeds)
    elif check.op == "==":
        result = _exact_equality(ctx, paired_seeds)
    else:
        result = _directional(ctx, paired_seeds)
    if same_configuration and check.op in ("<", "<=", ">", ">="):
        # The two arms are one configuration: a "significant" gap is a false positive by
        # construction, so neither direction can be claimed.
        alone = f" (the test alone would have said {result.verdict})" \
            if result.verdict != "inconclusive" else ""
        result = replace(result, verdict="inconclusive", same_configuration=True, reason=(
            f"{check.arm} and {check.than} ran the same configuration (an A/A comparison): any "
            f"difference between them is seed noise, so no direction can be claimed{alone}"),
            power_note="same configuration: no number of seeds will show a real difference",
            seeds_needed=None)
    if notes and b is not None and result.analysis in ("paired", "welch", "exact"):
        # Improvement is on the claimed side; for an equivalence claim, in the metric's own
        # better direction.
        lower = check.op in ("<", "<=") if check.op in ("<", "<=", ">", ">=") else \
            RUN_METRICS.get(check.metric or "", "lower") == "lower"
        result = replace(result, improvement=prob_improvement(
            a, b, lower_is_better=lower, paired_seeds=paired_seeds))
    return result


# -- the cases -----------------------------------------------------------------------------------


def _pairs(values: Values) -> list[tuple[int, float]]:
    return [(int(v[0]), float(v[1])) if isinstance(v, tuple) else (i, float(v))
            for i, v in enumerate(values)]


@dataclass(frozen=True)
class _Ctx:
    check: Check
    a: list[tuple[int, float]]
    b: list[tuple[int, float]] | None
    alpha: float
    level: Level
    notes: bool
    tested: bool

    @property
    def va(self) -> list[float]:
        return [v for _, v in self.a]

    @property
    def vb(self) -> list[float]:
        return [v for _, v in self.b or []]

    @property
    def display(self) -> float:
        return 1 - self.alpha

    def base(self, **kw: object) -> CheckResult:
        c = self.check
        ref_mean = _mean(self.vb) if self.b is not None else float(c.value or 0.0)
        mean_a = _mean(self.va)
        fields: dict[str, object] = {
            "description": c.label(), "metric": c.measure, "arm": c.arm, "op": c.op,
            "reference": c.than if c.than is not None else f"{c.value:g}", "margin": c.margin,
            "n_arm": len(self.a), "n_ref": None if self.b is None else len(self.b),
            "mean_arm": mean_a, "mean_ref": ref_mean, "diff": mean_a - ref_mean,
            "tested": self.tested}
        fields.update(kw)
        return CheckResult(**fields)  # type: ignore[arg-type]

    def no_data(self, why: str) -> CheckResult:
        nan = math.nan
        return self.base(verdict="inconclusive", reason=why, test="no data", mean_arm=nan,
                         mean_ref=nan, diff=nan,
                         power_note="nothing to estimate a spread from: run the arm first")

    def too_small(self) -> str:
        c = self.check
        groups = [(c.arm, self.a)] + ([(c.than or "", self.b)] if self.b is not None else [])
        small = ", ".join(f"{len(v)} seed{'s' if len(v) != 1 else ''} in {arm}"
                          for arm, v in groups if len(v) < 2)
        return f"n too small for a test ({small or 'fewer than 2 seeds both arms ran'})"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _holds(x: float, op: str, threshold: float, margin: float) -> bool:
    """Whether one value satisfies the claim ``x op threshold + margin`` (``==``: within
    ±margin of the threshold)."""
    if op == "==":
        return abs(x - threshold) <= margin
    bound = threshold + margin
    return {"<": x < bound, "<=": x <= bound, ">": x > bound, ">=": x >= bound}[op]


_SPREAD_UNKNOWN = ("spread unknown with fewer than 2 seeds: run at least 3 seeds per arm to "
                   "estimate it and test the difference")


def _pct(confidence: float) -> str:
    return f"{100 * confidence:.4g}%"


def _two_sided_p(d: Difference, margin: float) -> float:
    if margin == 0 and d.p is not None:
        return d.p
    above = one_sided_p(d, margin, above=True)
    below = one_sided_p(d, margin, above=False)
    assert above is not None and below is not None
    return min(1.0, 2 * min(above, below))


def _test_name(d: Difference, one_sample: bool = False) -> str:
    if one_sample and isinstance(d, Paired):
        return f"one-sample t-test (n={d.n})"
    return d.name


def _decide(ctx: _Ctx, d: Difference, one_sample: bool = False) -> CheckResult:
    """A directional claim on a testable difference: two-sided test against the margin."""
    c, level = ctx.check, ctx.level
    p = _two_sided_p(d, c.margin)
    threshold = level.two_sided
    shown = (d.ci_low, d.ci_high)  # computed at the display confidence
    decision = shown if abs(threshold - ctx.alpha) < 1e-15 else interval(d, 1 - threshold)
    assert decision is not None
    lo, hi = decision
    verdict: Outcome = "inconclusive"
    where = f"the {_pct(1 - threshold)} interval of the difference"
    if p <= threshold:
        low = d.diff < c.margin
        verdict = "supported" if low == (c.op in ("<", "<=")) else "refuted"
        reason = f"{where} lies entirely {'below' if low else 'above'} {c.margin:g}"
    else:
        reason = f"{where} straddles {c.margin:g}"
    kw: dict[str, object] = dict(
        verdict=verdict, reason=reason, test=_test_name(d, one_sample), p=p,
        threshold=threshold, ci_low=shown[0], ci_high=shown[1], decision_low=lo,
        decision_high=hi, diff=d.diff)
    if isinstance(d, Paired):
        kw.update(pairs=d.pairs, sd_diff=d.sd,
                  analysis="one-sample" if one_sample else "paired")
    else:
        kw.update(analysis="welch")
    return ctx.base(**kw)


def _against_value(ctx: _Ctx) -> CheckResult:
    c, a = ctx.check, ctx.a
    value = float(c.value)  # type: ignore[arg-type]
    if not ctx.tested:
        ok = [_holds(x, c.op, value, c.margin) for x in ctx.va]
        verdict: Outcome = "supported" if all(ok) else "refuted"
        claim = (f"within ±{c.margin:g} of {value:g}" if c.op == "==" and c.margin
                 else f"equal to {value:g}" if c.op == "=="
                 else f"{c.op} {value + c.margin:g}")
        return ctx.base(verdict=verdict, analysis="per-seed",
                        reason=f"{sum(ok)} of {len(a)} seeds have {c.measure} {claim} "
                               f"(the claim is about every seed)",
                        test="per-seed check (exact per run, no test needed)")
    # A one-sample test is a paired test against a constant reference.
    d = paired(a, [(s, value) for s, _ in a], confidence=ctx.display)
    if d.n < 2:
        return ctx.base(verdict="inconclusive", test=ctx.too_small(), power_note=_SPREAD_UNKNOWN,
                        reason="one seed gives no spread to judge a noisy metric by")
    if not d.testable:  # no spread: every seed gave the same value
        verdict = "supported" if _holds(d.diff, c.op, 0.0, c.margin) else "refuted"
        return ctx.base(verdict=verdict, ci_low=d.diff, ci_high=d.diff, analysis="exact",
                        test="exact (every seed gave the same value)",
                        reason=f"every seed gave {ctx.va[0]:.6g}")
    result = _decide(ctx, d, one_sample=True)
    if ctx.notes and result.verdict == "inconclusive":
        effect = d.diff - c.margin
        n = paired_seeds_needed(effect, d.sd, alpha=ctx.level.alpha, power=POWER)
        result = replace(result, seeds_needed=n, power_note=_power_note(effect, n, c.op, ctx))
    return result


def _difference(ctx: _Ctx, paired_seeds: bool) -> Difference:
    assert ctx.b is not None
    return paired(ctx.a, ctx.b, ctx.display) if paired_seeds else welch(ctx.va, ctx.vb,
                                                                         ctx.display)


def _directional(ctx: _Ctx, paired_seeds: bool) -> CheckResult:
    c = ctx.check
    d = _difference(ctx, paired_seeds)
    if d.testable:
        result = _decide(ctx, d)
    elif _n(d) < 2:
        return ctx.base(verdict="inconclusive", test=ctx.too_small(), power_note=_SPREAD_UNKNOWN,
                        reason="one seed gives no spread to judge a difference by",
                        analysis="paired" if paired_seeds else "welch")
    elif (d.reason or "").startswith("no spread"):
        verdict: Outcome = "supported" if _holds(d.diff, c.op, 0.0, c.margin) else "refuted"
        what = "every seed pair differed by the same amount" if paired_seeds else \
            "every seed of both arms gave the same value"
        return ctx.base(verdict=verdict, ci_low=d.diff, ci_high=d.diff, diff=d.diff,
                        analysis="exact", test=f"exact ({what})",
                        reason=f"the difference is exactly {d.diff:.6g}",
                        pairs=d.pairs if isinstance(d, Paired) else ())
    else:
        return ctx.base(verdict="inconclusive", reason=f"cannot test: {d.reason}",
                        test="not testable")
    if ctx.notes:
        result = _with_power(ctx, result, d, d.diff - c.margin, equivalence=False)
    return result


def _exact_equality(ctx: _Ctx, paired_seeds: bool) -> CheckResult:
    """``==`` between arms with no margin: exact for counts, otherwise only refutable."""
    if len(set(ctx.va) | set(ctx.vb)) == 1:
        return ctx.base(verdict="supported", ci_low=0.0, ci_high=0.0, analysis="exact",
                        test="exact (every seed of both arms gave the same value)",
                        reason=f"every seed of both arms gave {ctx.va[0]:.6g}")
    d = _difference(ctx, paired_seeds)
    if d.testable:
        p, threshold = _two_sided_p(d, 0.0), ctx.level.two_sided
        shown = interval(d, ctx.display)
        assert shown is not None
        refuted = p <= threshold
        return ctx.base(
            verdict="refuted" if refuted else "inconclusive", ci_low=shown[0], ci_high=shown[1],
            p=p, threshold=threshold, test=_test_name(d), diff=d.diff,
            analysis="paired" if paired_seeds else "welch",
            reason=(f"the {_pct(1 - threshold)} interval of the difference excludes 0"
                    if refuted else "exact equality of a noisy metric cannot be shown; use op "
                    "'equivalent' with a margin"))
    if (d.reason or "").startswith("no spread"):
        return ctx.base(verdict="refuted", ci_low=d.diff, ci_high=d.diff, analysis="exact",
                        test="exact (no spread)", reason=f"the difference is exactly {d.diff:.6g}")
    return ctx.base(verdict="inconclusive", test=ctx.too_small() if _n(d) < 2 else "not testable",
                    reason="exact equality of a noisy metric cannot be shown; use op "
                           "'equivalent' with a margin", power_note=_SPREAD_UNKNOWN)


def _equivalence(ctx: _Ctx, paired_seeds: bool) -> CheckResult:
    c, level = ctx.check, ctx.level
    margin = c.margin
    d = _difference(ctx, paired_seeds)
    analysis = "paired" if paired_seeds else "welch"
    if not d.testable:
        if _n(d) < 2:
            return ctx.base(verdict="inconclusive", test=ctx.too_small(), analysis=analysis,
                            reason="equivalence needs an interval, and one seed gives none",
                            power_note=_SPREAD_UNKNOWN)
        if (d.reason or "").startswith("no spread"):
            x = d.diff
            verdict: Outcome = "supported" if abs(x) < margin else "refuted"
            return ctx.base(verdict=verdict, ci_low=x, ci_high=x, ci90_low=x, ci90_high=x,
                            diff=x, analysis="exact", test="exact (no spread)",
                            reason=f"the difference is exactly {x:.6g} (margin ±{margin:g})")
        return ctx.base(verdict="inconclusive", reason=f"cannot test: {d.reason}",
                        test="not testable")
    # TOST: H0 diff <= -margin and H0 diff >= +margin, each one-sided at the equivalence level.
    p_low, p_high = one_sided_p(d, -margin, True), one_sided_p(d, margin, False)
    assert p_low is not None and p_high is not None
    p_tost = max(p_low, p_high)
    # Beyond the margin: the nearer bound, two-sided like a directional check.
    p_beyond = min(1.0, 2 * min(one_sided_p(d, margin, True) or 1.0,
                                one_sided_p(d, -margin, False) or 1.0))
    eq_level, out_level = level.equivalence, level.two_sided
    shown, tost_ci = interval(d, ctx.display), interval(d, 1 - 2 * ctx.alpha)
    eq_ci, out_ci = interval(d, 1 - 2 * eq_level), interval(d, 1 - out_level)
    assert shown and tost_ci and eq_ci and out_ci
    if p_tost <= eq_level:
        verdict, reason, p, threshold, dec = "supported", (
            f"the {_pct(1 - 2 * eq_level)} interval [{eq_ci[0]:.4g}, {eq_ci[1]:.4g}] lies "
            f"inside ±{margin:g} (TOST, each side at {eq_level:.3g})"), p_tost, eq_level, eq_ci
    elif p_beyond <= out_level:
        verdict, reason, p, threshold, dec = "refuted", (
            f"the {_pct(1 - out_level)} interval [{out_ci[0]:.4g}, {out_ci[1]:.4g}] lies "
            f"entirely outside ±{margin:g}"), p_beyond, out_level, out_ci
    else:
        inside = abs(d.diff) < margin
        verdict, p = "inconclusive", p_tost if inside else p_beyond
        threshold, dec = (eq_level, eq_ci) if inside else (out_level, out_ci)
        reason = (f"the {_pct(1 - 2 * eq_level)} interval [{eq_ci[0]:.4g}, {eq_ci[1]:.4g}] is "
                  f"not inside ±{margin:g} and the {_pct(1 - out_level)} interval is not outside "
                  "it: neither equivalence nor a difference is shown")
    result = ctx.base(
        verdict=verdict, reason=reason, p=p, threshold=threshold, diff=d.diff,
        ci_low=shown[0], ci_high=shown[1], ci90_low=tost_ci[0], ci90_high=tost_ci[1],
        decision_low=dec[0], decision_high=dec[1], analysis=analysis,
        test=f"TOST (two one-sided {'paired' if paired_seeds else 'Welch'} tests, "
             f"df={d.df:.1f})", pairs=d.pairs if isinstance(d, Paired) else (),
        sd_diff=d.sd if isinstance(d, Paired) else None)
    if ctx.notes:
        result = _with_power(ctx, result, d, margin - abs(d.diff), equivalence=True)
    return result


def _n(d: Difference) -> int:
    return d.n if isinstance(d, Paired) else min(d.n_a, d.n_b)


def _needed(ctx: _Ctx, d: Difference, effect: float, alpha: float, paired_: bool) -> int | None:
    if paired_:
        assert isinstance(d, Paired)
        return paired_seeds_needed(effect, d.sd, alpha=alpha, power=POWER)
    sd_a, sd_b = summarize(ctx.va).std, summarize(ctx.vb).std
    if not (math.isfinite(sd_a) and math.isfinite(sd_b)):
        return None
    return seeds_needed(effect, sd_a, sd_b, alpha=alpha, power=POWER)


def _with_power(ctx: _Ctx, result: CheckResult, d: Difference, effect: float, *,
                equivalence: bool) -> CheckResult:
    """Seeds needed to settle the check (at this check's share of alpha), in the design's
    analysis and, for a paired check, what Welch's test would need (reference only)."""
    share = ctx.level.alpha
    # TOST at alpha per side needs about the power of a two-sided test at 2 alpha.
    test_alpha = min(2 * share, 0.5) if equivalence and effect > 0 else share
    size = abs(effect) if equivalence else effect
    is_paired = isinstance(d, Paired)
    n = _needed(ctx, d, size, test_alpha, is_paired)
    changes: dict[str, object] = {"seeds_needed": n}
    if is_paired:
        w = welch(ctx.va, ctx.vb, ctx.display)
        changes["welch_ci"] = (w.ci_low, w.ci_high) if w.testable else None
        changes["welch_seeds_needed"] = _needed(ctx, w, size, test_alpha, False)
    if result.verdict == "inconclusive":  # the power note says what would settle it
        if equivalence:
            goal = "show equivalence" if effect > 0 else "show a difference beyond the margin"
            changes["power_note"] = (
                _seeds_text(n) + f" per arm would {goal}, if the observed difference "
                f"({d.diff:.4g}) and spreads are the true ones ({'paired' if is_paired else 'Welch'}"
                f" power at {POWER:.0%}, α={test_alpha:.3g})")
        else:
            changes["power_note"] = _power_note(effect, n, ctx.check.op, ctx,
                                                "paired" if is_paired else "Welch")
    return replace(result, **changes)  # type: ignore[arg-type]


def _power_note(effect: float, n: int | None, op: str, ctx: _Ctx, kind: str = "one-sample") -> str:
    sign = -1 if op in ("<", "<=") else 1
    at = f"at {POWER:.0%} power, α={ctx.level.alpha:.3g} ({kind} t-test)"
    if effect == 0:
        return ("the observed difference sits exactly on the threshold: no number of seeds is "
                "expected to settle it")
    if effect * sign > 0:
        return (_seeds_text(n) + f" per arm would detect the observed difference "
                f"({effect:+.4g} beyond the margin) {at}, if it and the spreads are the true ones")
    return ("the observed difference points against the prediction; " + _seeds_text(n)
            + f" per arm would make it significant {at} (refuting the check)")


def _seeds_text(n: int | None) -> str:
    return "more than a million seeds" if n is None else f"about {n} seed{'s' if n != 1 else ''}"
