"""Section 9, Interpretation: the hypothesis verdict check by check (with the analysis the design
called for, the per-seed differences of paired checks and, for an until-settled experiment,
every look), each expected outcome answered, then the template's four questions (match,
instability, interactions, compute efficiency) answered from the findings, in words that follow
the statistics: a difference within noise is a tie, and a prediction the data contradict is
said to be contradicted."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.analysis.checks import CheckResult
from lmlab.analysis.findings import PredictedInstability, Quickest
from lmlab.report.format import Question, Table, fmt_value, integer, mean_pm, metric_pm, sig
from lmlab.report.format import seconds as fmt_seconds
from lmlab.report.inputs import ReportInputs
from lmlab.report.sections.evidence import (
    analysis_notes,
    check_rows,
    differences_table,
    looks_table,
    outcome_answers,
)


@dataclass(frozen=True)
class Interpretation:
    overall: str  # SUPPORTED | REFUTED | INCONCLUSIVE
    overall_reason: str
    checks: Table
    analysis: list[str]  # which analysis each comparison used, and why
    differences: Table | None  # per-seed differences of the paired checks
    looks: Table | None  # an until-settled experiment's looks
    looks_note: str | None
    questions: list[Question]
    efficiency: Table | None


def check_headers(alpha: float) -> list[str]:
    return ["Check", "Verdict", "Analysis", f"Difference ({100 * (1 - alpha):g}% CI)", "Test",
            "P(improvement)", "Why"]


def section(inputs: ReportInputs) -> Interpretation:
    v = inputs.verdict
    looks, looks_note = looks_table(inputs)
    return Interpretation(
        overall=v.overall.upper(), overall_reason=v.reason,
        checks=Table(check_headers(v.alpha), check_rows(inputs, v.checks)),
        analysis=analysis_notes(inputs), differences=differences_table(inputs),
        looks=looks, looks_note=looks_note,
        questions=[Question("Did results match hypothesis?", _matched(inputs)),
                   Question("Expected outcomes (section 7): were they met?",
                            outcome_answers(inputs)),
                   Question("Any instability?", _instability(inputs)),
                   Question("Any unexpected interactions?", _interactions(inputs)),
                   Question("Was performance compute-efficient?", _efficiency(inputs))],
        efficiency=_efficiency_table(inputs))


def _matched(inputs: ReportInputs) -> list[str]:
    v = inputs.verdict
    if not v.checks:
        return [f"{v.overall.capitalize()}: {v.reason}; judge the prediction against the "
                "quantitative summary by hand."]
    return [f"Overall: {v.overall.upper()} — {v.reason}."] + [_said(c) for c in v.checks]


def _said(c: CheckResult) -> str:
    """One check in words: what was predicted, what was seen, and what that means."""
    if c.verdict == "supported":
        return f"{c.description}: supported — {c.reason}."
    if c.verdict == "refuted":
        return f"{c.description}: refuted — the data contradict the prediction ({c.reason})."
    if c.tested and c.p is not None and math.isfinite(c.diff) and c.n_ref is not None:
        return (f"{c.description}: inconclusive — {c.arm} − {c.reference} = {c.diff:+.4g} is "
                f"within noise ({c.reason}): neither arm can be called better on this.")
    return f"{c.description}: inconclusive ({c.reason})."


def _instability(inputs: ReportInputs) -> list[str]:
    f = inputs.findings
    arms = f.instability
    if not arms:
        return ["No data yet."]
    out = []
    for a in arms:
        grad = (f"largest gradient norm {sig(a.max_grad_norm, 3)} (mean over seeds)"
                if a.max_grad_norm is not None else "")
        if a.events:
            out.append(f"{a.arm}: " + ", ".join(f"{n} {k}" for k, n in a.events.items())
                       + (f"; {grad}" if grad else "") + ".")
        else:
            out.append(f"{a.arm}: stable (no NaN, divergence or spike events); {grad}.")
    out += [_predicted(p) for p in f.predicted]
    if all(a.stable for a in arms):
        return ["No: every arm trained without NaN, divergence or spike events.", *out]
    return ["Yes — see the arms below and the markers on the loss curves.", *out]


KIND_WORDS = {"spike": "loss spikes", "divergence": "divergence (or non-finite steps)",
              "nan": "non-finite steps", "instability": "instability events"}


def _predicted(p: PredictedInstability) -> str:
    """A clause of the prediction about instability against what the runs did."""
    what = KIND_WORDS[p.kind]
    seen = ", ".join(f"{arm} {n}" for arm, n in p.seen.items())
    said = f"Predicted: \u201c{p.clause}\u201d; seen {what} per arm: {seen}"
    if p.agrees is None:
        return said + " (a hedged prediction: nothing to contradict)."
    if p.agrees:
        return said + " — as predicted."
    if p.expect == "absent":
        return said + f" — the data contradict it: {what} in {', '.join(p.seen_in)}."
    if p.seen_in:
        return said + (f" — the data contradict it: {what} were seen only in "
                       f"{', '.join(a for a in p.seen_in if a not in p.arms) or 'other arms'}"
                       if not set(p.seen_in) & set(p.arms) else
                       " — the data contradict it: not more than in the other arms") + "."
    return said + f" — the data contradict it: no {what} in any arm."


def _interactions(inputs: ReportInputs) -> list[str]:
    found = inputs.findings.interactions
    if len(found.variables) < 2:
        name = found.variables[0] if found.variables else "none"
        return [f"One independent variable ({name}): no interaction to look for."]
    if not found.pairs:
        return ["The design does not cross the variables (no value of one is tried at several "
                "values of another): interactions cannot be read from it."]
    out = []
    for i in found.pairs:
        detail = "; ".join(f"{fmt_value(best)} at {i.other} = {fmt_value(level)}"
                           for level, best in i.best_at)
        ties = [fmt_value(level) for (level, _), c in zip(i.best_at, i.clear, strict=False)
                if not c]
        if i.shown:
            out.append(f"Yes: the best {i.variable} depends on {i.other} ({detail}), at every "
                       "level beyond seed noise.")
        elif i.depends:
            out.append(f"Not shown: the best mean {i.variable} differs across {i.other} "
                       f"({detail}), but at {i.other} = {', '.join(ties)} the values tie within "
                       "seed noise, so no interaction is shown beyond noise.")
        else:
            out.append(f"No: the best mean {i.variable} is {fmt_value(i.best_at[0][1])} at every "
                       f"{i.other} tried.")
    out.append(f"(Judged on {inputs.primary}: the best mean at each level, tested against the "
               f"level's next-best value at α = {inputs.findings.alpha:g}.)")
    return out


def _quickest(q: Quickest | None, label: str, value: str) -> str | None:
    if q is None:
        return None
    if q.clear:
        return f"{label}: {q.arm} ({value}), ahead of every other arm beyond seed noise."
    names = ", ".join([q.arm] + [t.arm for t in q.tied])
    return (f"{label}: a tie within seed noise between {names} ({q.arm} has the smallest mean, "
            f"{value}, but its difference from {', '.join(t.arm for t in q.tied)} is not shown "
            f"at α = {q.tied[0].alpha:g}).")


def _efficiency(inputs: ReportInputs) -> list[str]:
    e = inputs.findings.efficiency
    if e is None:
        return ["No completed run yet."]
    out = [f"Target: validation loss {e.target:.4f}, the highest final loss of any included "
           "run (so every run reached it); per seed, the first evaluation at or below it, "
           "averaged over seeds (training seconds exclude evaluation)."]
    if e.tokens is not None:
        out.append(_quickest(e.tokens, "Fewest tokens",
                             f"{integer(e.reach[e.tokens.arm].tokens.mean)} tokens") or "")
    if e.seconds is not None:
        out.append(_quickest(e.seconds, "Least training time",
                             fmt_seconds(e.reach[e.seconds.arm].seconds.mean)) or "")
    if e.tokens and e.seconds and e.tokens.clear and e.seconds.clear and \
            e.tokens.arm != e.seconds.arm:
        out.append("The most token-efficient arm is not the fastest in wall-clock: its "
                   "per-token gain costs throughput.")
    if len(e.speeds) > 1:
        fast = max(e.speeds, key=lambda k: e.speeds[k])
        slow = min(e.speeds, key=lambda k: e.speeds[k])
        out.append(f"Throughput ranges from {integer(e.speeds[slow])} tokens/s ({slow}) to "
                   f"{integer(e.speeds[fast])} tokens/s ({fast}).")
    return [line for line in out if line]


def _efficiency_table(inputs: ReportInputs) -> Table | None:
    e = inputs.findings.efficiency
    if e is None:
        return None
    rows = [[arm, metric_pm(inputs.arms[arm], "final_val_loss"),
             metric_pm(inputs.arms[arm], "tokens_per_s"), mean_pm(r.tokens, 0),
             mean_pm(r.seconds, 1, unit=" s")] for arm, r in e.reach.items()]
    return Table(["Arm", "Final val loss", "Tokens/sec", f"Tokens to val loss {e.target:.4f}",
                  f"Training time to val loss {e.target:.4f}"], rows, ["l", "r", "r", "r", "r"])

