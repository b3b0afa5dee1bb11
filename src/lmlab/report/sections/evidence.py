"""Section 9's evidence: the table of checks (analysis, interval, test, Holm-adjusted p,
probability of improvement), which analysis each comparison used and why, the per-seed
differences of paired checks, the looks of an until-settled experiment, and the expected
outcomes answered. Words for :mod:`lmlab.report.sections.interpretation`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmlab.analysis.checks import CheckResult
from lmlab.report.format import NA, Table, plural, sig
from lmlab.report.inputs import ReportInputs

ANALYSIS_LABEL = {"welch": "Welch (unpaired)", "one-sample": "one-sample t",
                  "per-seed": "per seed (exact)", "exact": "exact (no spread)", "none": NA}
OUTCOME_WORD = {"supported": "MET", "refuted": "NOT MET", "inconclusive": "INCONCLUSIVE"}


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def difference(c: CheckResult, alpha: float = 0.05) -> str:
    """The difference a check judged, its intervals, and the two means it came from."""
    if not math.isfinite(c.diff):
        return NA
    text = f"{c.diff:+.4g}"
    if c.ci_low is not None and c.ci_high is not None and c.ci_low != c.ci_high:
        text += f" [{c.ci_low:+.4g}, {c.ci_high:+.4g}]"
    if c.ci90_low is not None and c.ci90_high is not None and c.ci90_low != c.ci90_high:
        text += f"; {_pct(1 - 2 * alpha)} CI [{c.ci90_low:+.4g}, {c.ci90_high:+.4g}]"
    if c.threshold is not None and c.decision_low is not None and c.decision_high is not None \
            and abs(c.threshold - alpha) > 1e-12 and c.op != "equivalent":
        text += (f"; decision interval ({_pct(1 - c.threshold)}) "
                 f"[{c.decision_low:+.4g}, {c.decision_high:+.4g}]")
    ref = "value" if c.n_ref is None else c.reference
    return text + f" ({c.arm} {sig(c.mean_arm)} vs {ref} {sig(c.mean_ref)})"


def test(c: CheckResult, tests: int = 1) -> str:
    n = f"n={c.n_arm}" + (f" vs {c.n_ref}" if c.n_ref is not None else "")
    text = c.test + (f", p = {c.p:.3g}" if c.p is not None else "")
    if c.p_adjusted is not None and tests > 1:
        text += f"; Holm-adjusted p = {c.p_adjusted:.3g}"
    return f"{text} ({n})"


def improvement(c: CheckResult) -> str:
    i = c.improvement
    if i is None:
        return NA
    text = f"{i.p:.2f} [{i.ci_low:.2f}, {i.ci_high:.2f}]"
    if i.wins is not None and i.n:
        text += f"; won {i.wins:g} of {i.n} seed pairs"
    return text


def analysis_label(c: CheckResult) -> str:
    if c.analysis == "paired":
        return f"paired ({plural(len(c.pairs), 'seed pair')})"
    return ANALYSIS_LABEL.get(c.analysis, c.analysis)


def why(c: CheckResult) -> str:
    parts = [c.reason]
    if c.level_note:
        parts.append(c.level_note)
    if c.power_note:
        parts.append(f"Power: {c.power_note}")
    return ". ".join(parts)


def check_rows(inputs: ReportInputs, results: Sequence[CheckResult]) -> list[list[str]]:
    alpha, tests = inputs.verdict.alpha, inputs.verdict.tests
    return [[c.description, c.verdict.upper(), analysis_label(c), difference(c, alpha),
             test(c, tests), improvement(c), why(c)] for c in results]


def _all_results(inputs: ReportInputs) -> list[CheckResult]:
    v = inputs.verdict
    return list(v.checks) + [r for _, r in v.outcomes if r is not None]


def analysis_notes(inputs: ReportInputs) -> list[str]:
    """Which analysis applied and why (decided from the design), the family-wise level, and
    for paired checks what pairing bought against Welch's test (for reference only)."""
    v = inputs.verdict
    out = []
    if v.tests > 1:
        out.append(f"Family-wise α = {v.alpha:g} over {v.tests} statistical checks (hypothesis "
                   "and expected outcomes), by Holm–Bonferroni: each is tested at α / (checks "
                   "still open), and the adjusted p-values are shown.")
    elif v.tests == 1:
        out.append(f"One statistical check, tested at α = {v.alpha:g}.")
    seen: set[tuple[str, str]] = set()
    for c in _all_results(inputs):
        if c.pairing_reason and (c.arm, c.reference) not in seen:
            seen.add((c.arm, c.reference))
            out.append(f"{c.arm} vs {c.reference}: {c.pairing_reason}.")
    for c in _all_results(inputs):
        if c.analysis != "paired" or c.ci_low is None or c.ci_high is None:
            continue
        width = c.ci_high - c.ci_low
        w = c.welch_ci
        vs = (f" vs {w[1] - w[0]:.4g} with Welch's test" if w and None not in w else "")
        needed = ""
        if c.seeds_needed is not None or c.welch_seeds_needed is not None:
            needed = (f"; seeds per arm to detect the observed difference at 80% power: "
                      f"{_n(c.seeds_needed)} paired vs {_n(c.welch_seeds_needed)} Welch")
        out.append(f"{c.description}: the per-seed differences have sd {sig(c.sd_diff, 3)}; "
                   f"{_pct(1 - v.alpha)} interval width {width:.4g} paired{vs}{needed} (Welch "
                   "for reference only: the verdict uses the analysis the design fixed).")
    return out


def _n(n: int | None) -> str:
    return "more than a million" if n is None else str(n)


def differences_table(inputs: ReportInputs) -> Table | None:
    rows = []
    for c in _all_results(inputs):
        if c.analysis != "paired" or not c.pairs:
            continue
        for seed, a, b in c.pairs:
            rows.append([c.description, str(seed), sig(a, 6), sig(b, 6), f"{a - b:+.4g}"])
        rows.append([c.description, "mean (sd)", sig(c.mean_arm, 6), sig(c.mean_ref, 6),
                     f"{c.diff:+.4g} ({sig(c.sd_diff, 3)})"])
    if not rows:
        return None
    return Table(["Check", "Seed", "Arm", "Reference", "Difference"], rows,
                 ["l", "r", "r", "r", "r"])


def looks_table(inputs: ReportInputs) -> tuple[Table | None, str | None]:
    v = inputs.verdict
    if v.design is None:
        return None, None
    d = v.design
    rows = []
    for look in v.looks:
        for c in look.results:
            if not c.tested:
                continue
            earlier = c.look is not None and c.look < look.look
            rows.append([str(look.look), str(len(look.seeds)), c.description,
                         NA if c.p is None or earlier else f"{c.p:.3g}",
                         NA if c.threshold is None or earlier else f"≤ {c.threshold:.3g}",
                         f"{c.verdict} (at look {c.look})" if earlier else c.verdict])
    record = inputs.exp.sequential or {}
    stopped = record.get("stopped") or {}
    started = int(record.get("rounds_started", len(v.looks)))
    if stopped:
        where = (f"Stopped after look {stopped.get('look')} of at most {len(d.rounds)}: "
                 f"{stopped.get('reason')}.")
    else:
        where = (f"Running: round {started} of at most {len(d.rounds)} started, "
                 f"{plural(len(record.get('looks', [])), 'look')} taken so far.")
    note = (f"Seeds until settled: rounds of seeds {'; '.join(', '.join(map(str, r)) for r in d.rounds)}"
            f" (at most {d.max_seeds} per arm), family-wise α = {d.alpha:g} spent over the looks "
            f"with the {d.spending} spending function (boundary: the p-value each look's test "
            f"must reach). {where}")
    return Table(["Look", "Seeds per arm", "Check", "p", "Boundary", "Verdict"], rows,
                 ["r", "r", "l", "r", "r", "l"]), note


def outcome_answers(inputs: ReportInputs) -> list[str]:
    v = inputs.verdict
    if not v.outcomes:
        return ["No expected outcomes were written down."]
    out = []
    for o, r in v.outcomes:
        if r is None:
            out.append(f"\u201c{o.outcome}\u201d: not machine-checked (written as prose; give "
                       "it a check to have it judged).")
        else:
            out.append(f"\u201c{o.outcome}\u201d: {OUTCOME_WORD[r.verdict]} — {r.description}: "
                       f"{r.reason}.")
    return out
