"""Section 8, Results: raw observations first (what happened, in words, from the events and the
findings), then the quantitative summary over seeds and the per-run detail."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmlab.analysis.findings import Progress, WorseAtEnd
from lmlab.analysis.records import RunRecord
from lmlab.names import INSTABILITY_EVENTS, UNFINISHED, Event, Status
from lmlab.report.format import (
    NA,
    SUMMARY_METRICS,
    Table,
    fixed,
    integer,
    metric_pm,
    mib,
    plural,
    sig,
)
from lmlab.report.inputs import ReportInputs
from lmlab.report.sections.preflight import failure_reasons

SUMMARY_NOTE = ("mean ± std over seeds (n = seeds included). Completed runs only for end-of-run "
                "metrics; see the notes column for seeds left out.")
# Statuses the notes column counts, in this order (completed runs need no note).
NOTED_STATUSES = (Status.DIVERGED, Status.FAILED, Status.OVER_BUDGET, Status.INTERRUPTED,
                  Status.RUNNING, Status.PENDING)


@dataclass(frozen=True)
class Results:
    observations: list[str]
    summary: Table
    summary_note: str
    per_run: Table


def section(inputs: ReportInputs) -> Results:
    label = inputs.memory_label
    rows = [[arm] + [metric_pm(a, m) for m in SUMMARY_METRICS] + ["; ".join(_notes(inputs, arm))]
            for arm, a in inputs.arms.items()]
    return Results(
        observations=observations(inputs),
        summary=Table(["Config", "Final Val Loss", "Final PPL", "Bits/byte", "Word PPL",
                       "Tokens/sec", label, "Notes"], rows, ["l"] + ["r"] * 6 + ["l"]),
        summary_note=SUMMARY_NOTE,
        per_run=Table(["Run", "Arm", "Seed", "Status", "Steps", "Tokens", "Final val loss",
                       "Final train loss", "Test loss", "Tokens/sec", label, "Max grad norm",
                       "Events"], [_run_row(r) for r in inputs.exp.runs],
                      ["l", "l", "r", "l"] + ["r"] * 8 + ["l"]))


def _run_row(r: RunRecord) -> list[str]:
    m = r.metrics
    events = ", ".join(f"{k} {n}" for k, n in sorted(r.event_counts().items())) or NA
    started = bool(r.summary or r.curves)
    return [r.run_id, r.arm, str(r.seed), r.status,
            integer(r.steps) if started else NA, integer(r.tokens) if started else NA,
            fixed(m["final_val_loss"], 4), fixed(m["final_train_loss"], 4),
            fixed(m["test_loss"], 4), fixed(m["tokens_per_s"], 0), mib(m["peak_mem_bytes"]),
            sig(m["max_grad_norm"], 3), events]


def _notes(inputs: ReportInputs, arm: str) -> list[str]:
    f = inputs.findings
    notes = []
    tied = [t.arm for t in f.tied]
    if arm == f.best:
        notes.append(f"best mean {inputs.primary}, within noise of {', '.join(tied)}" if tied
                     else f"best {inputs.primary}")
    elif arm in tied:
        notes.append(f"within noise of the best ({f.best})")
    if arm == inputs.exp.reference and len(inputs.arms) > 1:
        notes.append("reference")
    counts = inputs.arms[arm].status_counts
    notes += [f"{counts[s]} {s.replace('_', ' ')}" for s in NOTED_STATUSES if counts.get(s)]
    if arm in f.spikes:
        notes.append(plural(f.spikes[arm].count, "loss spike"))
    progress = f.progress.get(arm)
    if progress is not None and progress.state != "flat":
        notes.append("still improving at the end" if progress.state == "improving" else
                     "worse over its last evaluations")
    return notes


def observations(inputs: ReportInputs) -> list[str]:
    """What happened, run by run and arm by arm, before any statistic."""
    exp, f = inputs.exp, inputs.findings
    runs = exp.runs
    out = [line for r in runs for e in r.events if (line := _event_line(r, e))]
    for arm, s in f.spikes.items():
        d = s.worst["detail"]
        out.append(f"{arm}: {plural(s.count, 'loss spike')} in {len(s.seeds)} of {s.n_runs} "
                   f"seeds; the largest (z = {sig(d.get('z'), 3)}) at step "
                   f"{s.worst['step']:,} of seed {s.worst_seed}, loss {sig(d.get('loss'))} "
                   f"against a running mean of {sig(d.get('mean'))}.")
    out += [_progress_line(arm, p) for arm, p in f.progress.items()]
    out += [_worse_line(w) for w in f.worse_at_end]
    out += [f"{d.arm}: its seeds disagree — the std of {inputs.primary} over seeds "
            f"({sig(d.std, 3)}) is at least the gap to the nearest arm ({sig(d.gap, 3)}), so its "
            "rank among the arms is not reliable." for d in f.disagreeing]
    for n in f.noisy_throughput:
        out.append(f"{n.arm}: throughput varies across seeds ({integer(n.mean)} ± "
                   f"{integer(n.std)} tokens/s, {100 * n.relative:.0f}% relative); the machine "
                   "was probably shared, so speed comparisons are unreliable.")
    for c in (exp.preflight or {}).get("configs", []):
        if not c.get("passed"):
            out.append(f"Preflight failed for {c.get('key')} (arms "
                       f"{', '.join(c.get('arms', []))}): {failure_reasons(c)}.")
    for r in runs:
        if r.status == Status.FAILED:
            err = (r.error or "no error recorded").strip().splitlines()
            out.append(f"{r.run_id} failed: {err[-1] if err else 'no error recorded'}")
        elif r.status == Status.OVER_BUDGET and not any(
                e["kind"] in (Event.OOM, Event.OVER_BUDGET) for e in r.events):
            out.append(f"{r.run_id} stopped over budget "
                       f"({r.summary.get('reason', 'no reason')}).")
    out += [_stopped_line(r) for r in runs if r.stopped_at_step is not None and r.last_eval]
    unfinished = Counter(r.status for r in runs if r.status in UNFINISHED)
    if unfinished:
        out.append("Not finished: " + ", ".join(f"{n} {s}" for s, n in unfinished.items())
                   + " — this report is partial.")
    for kind, text in ((Event.COMPILE_FALLBACK, "torch.compile fell back to eager mode in {}."),
                       (Event.RESUME, "Resumed from a checkpoint: {}.")):
        ids = sorted({r.run_id for r in runs for e in r.events if e["kind"] == kind})
        if ids:
            out.append(text.format(", ".join(ids)))
    for e in exp.experiment_events:
        if e["kind"] == Event.PREFLIGHT:
            continue  # its outcome is reported from the preflight record itself
        detail = ", ".join(f"{k} {v}" for k, v in sorted(e["detail"].items()))
        out.append(f"Experiment event '{e['kind']}'" + (f": {detail}." if detail else "."))
    unstable = any(e["kind"] in INSTABILITY_EVENTS for r in runs for e in r.events)
    started = [r for r in runs if r.curves]
    if started and not unstable:
        done = sum(r.completed for r in runs)
        out.insert(0, f"{done} of {len(runs)} runs completed; no NaN, divergence or loss-spike "
                      f"events in the {len(started)} that have started.")
    if not started:
        out.insert(0, "No run has logged anything yet." if runs else "No runs in the store yet.")
    return out


def _progress_line(arm: str, p: Progress) -> str:
    """Where an arm's training stood at the end, against the seed noise, said either way."""
    noise = (f"the seed spread of its final loss ({fixed(p.spread, 4)})" if p.spread is not None
             else f"1% of the loss ({fixed(p.yardstick, 4)}; one seed: no spread)")
    over = f"over its last {p.intervals} evaluation intervals"
    if p.capped:
        over += (" (on the capped periodic evaluations: the final full-split one measures "
                 "different text)")
    if p.state == "improving":
        return (f"{arm} was still improving at the end: validation loss fell by "
                f"{fixed(p.drop, 4)} {over}, more than {noise}; under-trained at this budget.")
    if p.state == "worsening":
        return (f"{arm} got worse at the end: validation loss rose by {fixed(-p.drop, 4)} {over},"
                f" more than {noise}; stalled or over-fitting at this budget.")
    return (f"{arm} had flattened by the end: validation loss "
            f"{'fell' if p.drop >= 0 else 'rose'} by only {fixed(abs(p.drop), 4)} {over}, "
            f"within {noise}; not under-trained at the precision these seeds give.")


def _worse_line(w: WorseAtEnd) -> str:
    which = ("last periodic evaluation (capped, like the one before it; the final full-split "
             "one measures different text)" if w.capped else "last evaluation")
    noise = ("one seed in its arm: no spread to judge the rise by" if w.beyond_noise is None
             else f"{'more than' if w.beyond_noise else 'within'} the seed spread of its arm "
                  f"({fixed(w.spread, 4)})")
    return (f"{w.run_id} got worse at its {which}: validation loss {fixed(w.before.loss, 4)} at "
            f"step {w.before.step:,} → {fixed(w.last.loss, 4)} at step {w.last.step:,} "
            f"({w.rise:+.4f}, {noise}).")


def _event_line(r: RunRecord, e: dict) -> str | None:
    d, kind = e["detail"], e["kind"]
    if kind == Event.DIVERGENCE:
        return (f"{r.run_id} diverged at step {e['step']:,} ({e['tokens']:,} tokens): loss "
                f"{sig(d.get('loss'))} above {sig(d.get('factor'), 3)}× its early loss "
                f"{sig(d.get('early_loss'))}.")
    if kind == Event.NAN:
        return (f"{r.run_id} hit a non-finite loss or gradient norm at step {e['step']:,} "
                f"({e['tokens']:,} tokens; loss {sig(d.get('loss'))}, grad norm "
                f"{sig(d.get('grad_norm'))}); it stopped before the optimizer step.")
    if kind == Event.OOM:
        return f"{r.run_id} ran out of memory at step {e['step']:,}."
    if kind == Event.OVER_BUDGET:
        return (f"{r.run_id} exceeded the memory budget at step {e['step']:,}: peak "
                f"{mib(d.get('peak_mem_bytes'))} > {sig(d.get('max_memory_mb'))} MiB.")
    return None


def _stopped_line(r: RunRecord) -> str:
    """A run that did not complete has no final metrics; what it measured last is its last
    evaluation before it stopped, said as such."""
    last = r.last_eval
    assert last is not None
    return (f"{r.run_id} stopped at step {r.stopped_at_step:,} ({r.status.replace('_', ' ')}), "
            f"so it has no final metrics; its last evaluation, at step {last.step:,} "
            f"({last.tokens:,} tokens), had validation loss {fixed(last.loss, 4)}.")
