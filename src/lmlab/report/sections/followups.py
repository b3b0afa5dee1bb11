"""Section 11, Follow-up Questions: what remains unclear (undecided checks, single seeds, seeds
that disagree), what needs a deeper sweep (an optimum at the edge of the range, diverged or
under-trained arms), and whether the experiment moves to Phase-1."""

from __future__ import annotations

from lmlab.names import Status
from lmlab.report.format import Question, fmt_value, plural
from lmlab.report.inputs import ReportInputs


def section(inputs: ReportInputs) -> list[Question]:
    return [Question("What remains unclear?", _unclear(inputs)),
            Question("What needs a deeper sweep?", _sweep(inputs)),
            Question("Does this move to Phase-1 or require refinement?", _phase1(inputs))]


def _unclear(inputs: ReportInputs) -> list[str]:
    out = []
    for c in inputs.verdict.checks:
        if c.verdict == "inconclusive":
            out.append(f"{c.description}: inconclusive — "
                       + (f"run {c.seeds_needed} seeds per arm ({c.power_note})."
                          if c.seeds_needed else f"{c.power_note or c.reason}."))
    single = [arm for arm, a in inputs.arms.items() if a.stats[inputs.primary].n == 1]
    if single:
        out.append(f"Only one seed in {', '.join(single)}: run at least 3 to measure the "
                   "seed-to-seed spread.")
    out += [f"{d.arm}: its seeds disagree: run more seeds to rank it."
            for d in inputs.findings.disagreeing]
    return out or ["Nothing the data flags: every check was decided."]


def _sweep(inputs: ReportInputs) -> list[str]:
    f = inputs.findings
    out = []
    for e in f.edge_of_range:
        out.append(f"The best {e.variable} ({fmt_value(e.value)}) is the "
                   f"{'largest' if e.upward else 'smallest'} value tried "
                   f"({fmt_value(e.low)} to {fmt_value(e.high)}): extend the sweep "
                   f"{'upward' if e.upward else 'downward'} (e.g. {e.next_value:g}).")
    for arm, a in inputs.arms.items():
        if n := a.status_counts.get(Status.DIVERGED):
            lr = inputs.exp.arm_values(arm).get("optimizer.lr", inputs.flat.get("optimizer.lr"))
            out.append(f"{arm} diverged in {n} of {len(a.runs)} seeds: retry it with a lower "
                       f"learning rate (now {fmt_value(lr)}) or a longer warmup.")
    if f.under_trained:
        out.append(f"{', '.join(f.under_trained)} still improving at the end: a longer budget "
                   "(e.g. 2× tokens) would show whether the ranking holds.")
    if not out:
        out.append("Not yet: no arm has a result." if f.best is None else
                   "No: the best arm lies inside the swept range and no arm diverged or was "
                   "under-trained.")
    return out


def _phase1(inputs: ReportInputs) -> list[str]:
    p = inputs.findings.phase1
    if p.ready:
        caveats = []
        if p.diverged:
            caveats.append(f"{plural(len(p.diverged), 'run')} diverged ({', '.join(p.diverged)})")
        if p.under_trained:
            caveats.append(f"{', '.join(p.under_trained)} still improving at the end")
        return [f"Moves to Phase-1: {p.verdict_reason}"
                + (f"; carry these caveats along: {'; '.join(caveats)}." if caveats else
                   "; every run completed its budget.")]
    reasons = []
    if p.verdict == "refuted":
        reasons.append(f"the hypothesis was refuted ({p.verdict_reason}): revise the mechanism "
                       "or the prediction before scaling up")
    elif p.verdict == "inconclusive":
        reasons.append(f"the verdict is inconclusive ({p.verdict_reason})"
                       + (f": rerun with about {p.seeds_needed} seeds per arm"
                          if p.seeds_needed else ""))
    if p.preflight_failed:
        reasons.append("the preflight failed")
    if p.failed:
        reasons.append(f"{len(p.failed)} runs failed or went over budget")
    if p.unfinished:
        reasons.append(f"{len(p.unfinished)} runs have not finished")
    return ["Requires refinement: " + "; ".join(reasons) + "."]
