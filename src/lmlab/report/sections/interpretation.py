"""Section 9, Interpretation: the hypothesis verdict check by check, then the template's four
questions (match, instability, interactions, compute efficiency), answered from the findings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.analysis.verdict import CheckResult
from lmlab.report.format import NA, Question, Table, fmt_value, integer, mean_pm, metric_pm, sig
from lmlab.report.format import seconds as fmt_seconds
from lmlab.report.inputs import ReportInputs


@dataclass(frozen=True)
class Interpretation:
    overall: str  # SUPPORTED | REFUTED | INCONCLUSIVE
    overall_reason: str
    checks: Table
    questions: list[Question]
    efficiency: Table | None


def section(inputs: ReportInputs) -> Interpretation:
    v = inputs.verdict
    rows = [[c.description, c.verdict.upper(), difference(c), test(c),
             c.reason + (f". Power: {c.power_note}" if c.power_note else "")] for c in v.checks]
    return Interpretation(
        overall=v.overall.upper(), overall_reason=v.reason,
        checks=Table(["Check", "Verdict", "Difference (95% CI)", "Test", "Why"], rows),
        questions=[Question("Did results match hypothesis?", _matched(inputs)),
                   Question("Any instability?", _instability(inputs)),
                   Question("Any unexpected interactions?", _interactions(inputs)),
                   Question("Was performance compute-efficient?", _efficiency(inputs))],
        efficiency=_efficiency_table(inputs))


def difference(c: CheckResult) -> str:
    """The difference a check judged, its intervals, and the two means it came from."""
    if not math.isfinite(c.diff):
        return NA
    text = f"{c.diff:+.4g}"
    if c.ci_low is not None and c.ci_high is not None and c.ci_low != c.ci_high:
        text += f" [{c.ci_low:+.4g}, {c.ci_high:+.4g}]"
    if c.ci90_low is not None and c.ci90_high is not None and c.ci90_low != c.ci90_high:
        text += f"; 90% CI [{c.ci90_low:+.4g}, {c.ci90_high:+.4g}]"
    ref = "value" if c.n_ref is None else c.reference
    return text + f" ({c.arm} {sig(c.mean_arm)} vs {ref} {sig(c.mean_ref)})"


def test(c: CheckResult) -> str:
    n = f"n={c.n_arm}" + (f" vs {c.n_ref}" if c.n_ref is not None else "")
    p = f", p = {c.p:.3g}" if c.p is not None else ""
    return f"{c.test}{p} ({n})"


def _matched(inputs: ReportInputs) -> list[str]:
    v = inputs.verdict
    if not v.checks:
        return [f"{v.overall.capitalize()}: {v.reason}; judge the prediction against the "
                "quantitative summary by hand."]
    return [f"Overall: {v.overall.upper()} — {v.reason}."] + [
        f"{c.description}: {c.verdict} ({c.reason})." for c in v.checks]


def _instability(inputs: ReportInputs) -> list[str]:
    arms = inputs.findings.instability
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
    if all(a.stable for a in arms):
        return ["No: every arm trained without NaN, divergence or spike events.", *out]
    return ["Yes — see the arms below and the markers on the loss curves.", *out]


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
        if i.depends:
            detail = "; ".join(f"{fmt_value(best)} at {i.other} = {fmt_value(level)}"
                               for level, best in i.best_at)
            out.append(f"Yes: the best {i.variable} depends on {i.other} ({detail}).")
        else:
            out.append(f"No: the best {i.variable} is {fmt_value(i.best_at[0][1])} at every "
                       f"{i.other} tried.")
    out.append(f"(Judged on mean {inputs.primary}; differences smaller than the seed spread in "
               "the quantitative summary are not evidence of an interaction.)")
    return out


def _efficiency(inputs: ReportInputs) -> list[str]:
    e = inputs.findings.efficiency
    if e is None:
        return ["No completed run yet."]
    out = [f"Target: validation loss {e.target:.4f}, the highest final loss of any included "
           "run (so every run reached it); per seed, the first evaluation at or below it, "
           "averaged over seeds (training seconds exclude evaluation)."]
    fewest, least = e.fewest_tokens, e.least_time
    if fewest is not None:
        out.append(f"Fewest tokens: {fewest} ({integer(e.reach[fewest].tokens.mean)} tokens).")
    if least is not None:
        out.append(f"Least training time: {least} "
                   f"({fmt_seconds(e.reach[least].seconds.mean)}).")
    if fewest is not None and fewest != least:
        out.append("The most token-efficient arm is not the fastest in wall-clock: its "
                   "per-token gain costs throughput.")
    if len(e.speeds) > 1:
        fast = max(e.speeds, key=lambda k: e.speeds[k])
        slow = min(e.speeds, key=lambda k: e.speeds[k])
        out.append(f"Throughput ranges from {integer(e.speeds[slow])} tokens/s ({slow}) to "
                   f"{integer(e.speeds[fast])} tokens/s ({fast}).")
    return out


def _efficiency_table(inputs: ReportInputs) -> Table | None:
    e = inputs.findings.efficiency
    if e is None:
        return None
    rows = [[arm, metric_pm(inputs.arms[arm], "final_val_loss"),
             metric_pm(inputs.arms[arm], "tokens_per_s"), mean_pm(r.tokens, 0),
             mean_pm(r.seconds, 1, unit=" s")] for arm, r in e.reach.items()]
    return Table(["Arm", "Final val loss", "Tokens/sec", f"Tokens to val loss {e.target:.4f}",
                  f"Training time to val loss {e.target:.4f}"], rows, ["l", "r", "r", "r", "r"])
