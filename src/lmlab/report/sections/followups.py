"""Section 11, Follow-up Questions: what remains unclear (undecided checks, single seeds, seeds
that disagree), what needs a deeper sweep (an optimum at the edge of the range, diverged or
under-trained arms), and whether the experiment moves to Phase-1."""

from __future__ import annotations

from lmlab.names import Status
from lmlab.report.format import Question, fmt_value, plural
from lmlab.report.inputs import ReportInputs

# More seeds per arm than this to settle a check: say so instead of suggesting the run.
PRACTICAL_SEEDS = 50


def section(inputs: ReportInputs) -> list[Question]:
    return [Question("What remains unclear?", _unclear(inputs)),
            Question("What needs a deeper sweep?", _sweep(inputs)),
            Question("Does this move to Phase-1 or require refinement?", _phase1(inputs))]


def _unclear(inputs: ReportInputs) -> list[str]:
    v, f = inputs.verdict, inputs.findings
    out = []
    for c in v.checks:
        if c.verdict == "inconclusive":
            out.append(f"{c.description}: inconclusive — {c.power_note or c.reason}.")
    for o, r in v.outcomes:
        if r is not None and r.verdict == "inconclusive":
            out.append(f"Expected outcome \u201c{o.outcome}\u201d: not settled — "
                       f"{r.power_note or r.reason}.")
    if f.tied and f.best is not None:
        out.append(f"Whether {f.best} or {', '.join(t.arm for t in f.tied)} is better on "
                   f"{inputs.primary}: the difference is within seed noise.")
    need = [c.seeds_needed for c in [*v.checks, *(r for _, r in v.outcomes if r is not None)]
            if c.verdict == "inconclusive" and c.seeds_needed]
    if need and v.design is None and max(need) <= PRACTICAL_SEEDS:
        out.append(f"To settle them without guessing a seed count: `lmlab run SPEC "
                   f"--until-settled --max-seeds {max(need)}` adds seeds in rounds and stops "
                   "as soon as every check is settled (a group-sequential design keeps α).")
    elif need and v.design is None:
        out.append(f"Settling every open check would take up to {max(need)} seeds per arm: an "
                   "effect that small is not worth resolving by seeds at this scale; state it "
                   "as a tie (an equivalence check with a margin) or change the budget.")
    elif v.design is not None and not v.settled and (inputs.exp.sequential or {}).get("stopped"):
        out.append(f"The until-settled experiment reached its cap of {v.design.max_seeds} seeds "
                   "per arm with checks still open: the effect, if any, is smaller than these "
                   "seeds can resolve.")
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
        edge = (f"The best {e.variable} ({fmt_value(e.value)}) is the "
                f"{'largest' if e.upward else 'smallest'} value tried "
                f"({fmt_value(e.low)} to {fmt_value(e.high)})")
        rivals = sorted({fmt_value(v) for t in f.tied
                         if (v := inputs.exp.arm_values(t.arm).get(e.variable)) != e.value})
        if rivals:  # the best mean is at an edge, but within noise of other values
            out.append(f"{edge} by its mean only: it ties within noise with {e.variable} = "
                       f"{', '.join(rivals)}, so the sweep points nowhere yet; settle the "
                       "ranking before widening the range.")
        else:
            out.append(f"{edge}: extend the sweep {'upward' if e.upward else 'downward'} "
                       f"(e.g. {e.next_value:g}).")
    for arm, a in inputs.arms.items():
        if n := a.status_counts.get(Status.DIVERGED):
            lr = inputs.exp.arm_values(arm).get("optimizer.lr", inputs.flat.get("optimizer.lr"))
            out.append(f"{arm} diverged in {n} of {len(a.runs)} seeds: retry it with a lower "
                       f"learning rate (now {fmt_value(lr)}) or a longer warmup.")
    if f.under_trained:
        out.append(f"{', '.join(f.under_trained)} still improving at the end, by more than the "
                   "seed noise: a longer budget (e.g. 2× tokens) would show whether the ranking "
                   "holds.")
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
        if (f := inputs.findings).tied:
            caveats.append(f"the best arm {f.best} ties with "
                           f"{', '.join(t.arm for t in f.tied)} within noise: choose between "
                           "them there")
        return [f"Moves to Phase-1: {p.verdict_reason}"
                + (f"; carry these caveats along: {'; '.join(caveats)}." if caveats else
                   "; every run completed its budget.")]
    reasons = []
    if p.verdict == "refuted":
        reasons.append(f"the hypothesis was refuted ({p.verdict_reason}): revise the mechanism "
                       "or the prediction before scaling up")
    elif p.verdict == "inconclusive":
        reasons.append(f"the verdict is inconclusive ({p.verdict_reason})"
                       + (f": about {p.seeds_needed} seeds per arm would settle it"
                          if p.seeds_needed else ""))
    if p.preflight_failed:
        reasons.append("the preflight failed")
    if p.failed:
        reasons.append(f"{len(p.failed)} runs failed or went over budget")
    if p.unfinished:
        reasons.append(f"{len(p.unfinished)} runs have not finished")
    return ["Requires refinement: " + "; ".join(reasons) + "."]
