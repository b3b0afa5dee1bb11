"""Section 10, Decision: the best arm's settings under the template's headings (LR, batch size,
optimizer, architecture), how far it is ahead of the runner-up, and whether the decision is
provisional (it is unless the hypothesis was supported and the best arm is ahead beyond noise).

A setting is only "selected" when the arm that has it is ahead beyond noise: when the best arm
ties with others that set it differently, the item says no preference is shown, and when an
equivalence check is supported, that the options are interchangeable within its margin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.analysis.checks import CheckResult
from lmlab.config import flatten
from lmlab.names import LR_PATHS, PER_SEED_PATHS
from lmlab.report.format import Item, fmt_value, metric_pm
from lmlab.report.inputs import ReportInputs
from lmlab.report.sections import tuning

# Variables the decision names under the template's headings (and names.LR_PATHS); any other is
# listed as "other".
BATCH_PATHS = ("train.batch_size", "train.grad_accum", "train.batch_size_start",
               "train.batch_ramp_steps")


@dataclass(frozen=True)
class Decision:
    items: list[Item]
    provisional: bool
    notes: list[str]


def _assign(paths: Sequence[str], values: Mapping[str, Any]) -> str:
    return ", ".join(f"{p} = {fmt_value(values.get(p))}" for p in paths)


def section(inputs: ReportInputs) -> Decision:
    f, primary = inputs.findings, inputs.primary
    best = f.best
    if best is None:
        return Decision([], True, [f"No arm has a defined {primary} yet: nothing to adopt."])
    chosen = flatten(inputs.arms[best].runs[0].config)
    items = [Item(label, tuning.selected_values(inputs, paths) or
                  (_choice(inputs, paths, chosen) if paths else fallback))
             for label, paths, fallback in _headings(set(inputs.exp.variables), inputs.flat)]
    tied = [t.arm for t in f.tied]
    provisional = inputs.verdict.overall != "supported" or bool(tied)
    a_pm = metric_pm(inputs.arms[best], primary)
    notes = [f"Best mean by {primary} ({inputs.direction} is better): {best}, {a_pm}" + (
        f" — not separated from {', '.join(tied)} at α = {f.alpha:g}: on this evidence no arm "
        "is preferred." if tied else ".")]
    if (r := f.runner_up) is not None:
        t = r.test
        if r.separated is not None and t.testable:
            notes.append(f"Over the runner-up {r.arm}: difference {t.diff:+.4g}, "
                         f"{100 * (1 - r.alpha):g}% CI [{t.ci_low:+.4g}, {t.ci_high:+.4g}], "
                         f"{t.name} p = {t.p:.3g} "
                         f"({'separated' if r.separated else 'NOT separated: a tie within noise'}"
                         f" at α = {r.alpha:g}).")
        elif r.separated is not None:
            notes.append(f"Over the runner-up {r.arm}: the difference is exactly {t.diff:+.4g} "
                         "(no spread in any seed).")
        else:
            notes.append(f"Over the runner-up {r.arm}: difference {t.diff:+.4g}; {t.reason}, so "
                         "the ranking is not tested.")
    notes += [f"{c.arm} and {c.reference} are interchangeable within ±{c.margin:g} on "
              f"{c.metric}: equivalence is supported ({c.reason})." for c in _equivalent(inputs)]
    if provisional:
        why = (f"the hypothesis verdict is {inputs.verdict.overall}"
               if inputs.verdict.overall != "supported" else
               f"the best arm ties with {', '.join(tied)} within noise")
        notes.append(f"PROVISIONAL: {why}; adopt only after the follow-ups below.")
    return Decision(items, provisional, notes)


def _equivalent(inputs: ReportInputs) -> list[CheckResult]:
    v = inputs.verdict
    return [c for c in [*v.checks, *(r for _, r in v.outcomes if r is not None)]
            if c.op == "equivalent" and c.verdict == "supported"]


def _headings(variables: set[str], flat: Mapping[str, Any]) -> list[tuple[str, list[str], str]]:
    """The template's headings: (label, the varied paths it covers, its text when none is)."""
    lr = [p for p in LR_PATHS if p in variables]
    batch = [p for p in BATCH_PATHS if p in variables]
    opt = sorted(p for p in variables if p.startswith("optimizer.") and p not in LR_PATHS)
    arch = sorted(p for p in variables if p.startswith("model."))
    out = [("Selected LR", lr, f"n/a (not varied; {_assign(LR_PATHS[:1], flat)} throughout)"),
           ("Selected batch size", batch,
            f"n/a (not varied; {_assign(BATCH_PATHS[:1], flat)} throughout)"),
           ("Selected optimizer", opt,
            f"n/a (not varied; {fmt_value(flat.get('optimizer.name'))} throughout)"),
           ("Any architectural preference", arch, "n/a (not varied)")]
    if rest := sorted(variables - {*lr, *batch, *opt, *arch} - PER_SEED_PATHS):
        out.append(("Other settings of the selected arm", rest, ""))
    return out


def _choice(inputs: ReportInputs, paths: list[str], chosen: Mapping[str, Any]) -> str:
    """The best arm's values of ``paths``, unless arms that set them otherwise tie with it."""
    mine = _assign(paths, chosen)
    rivals = []
    for t in inputs.findings.tied:
        theirs = flatten(inputs.arms[t.arm].runs[0].config) if inputs.arms[t.arm].runs else {}
        if any(repr(theirs.get(p)) != repr(chosen.get(p)) for p in paths):
            rivals.append((t, _assign(paths, theirs)))
    if not rivals:
        return mine
    best = inputs.findings.best
    same = {frozenset((c.arm, c.reference)) for c in _equivalent(inputs)}
    others = "; ".join(f"{values} ({t.arm}" + (f", {t.test.name} p = {t.test.p:.3g})"
                                              if t.test.p is not None else ")")
                       for t, values in rivals)
    if all(frozenset((best, t.arm)) in same for t, _ in rivals):
        return (f"interchangeable: {mine} or {others}, equivalent within the margin of the "
                "equivalence check")
    return f"none shown (provisional): {mine} has the best mean but ties within noise with {others}"
