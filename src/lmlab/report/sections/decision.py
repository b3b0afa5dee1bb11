"""Section 10, Decision: the best arm's settings under the template's headings (LR, batch size,
optimizer, architecture), how far it is ahead of the runner-up, and whether the decision is
provisional (it is unless the hypothesis was supported)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.config import flatten
from lmlab.names import PER_SEED_PATHS
from lmlab.report.format import Item, fmt_value, metric_pm
from lmlab.report.inputs import ReportInputs

# Variables the decision names under the template's headings; any other is listed as "other".
LR_PATHS = ("optimizer.lr", "optimizer.muon_lr")
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
    variables = set(inputs.exp.variables)
    chosen = flatten(inputs.arms[best].runs[0].config)
    used: set[str] = set()

    def pick(paths: Sequence[str], label: str) -> Item:
        mine = [p for p in paths if p in variables]
        used.update(mine)
        if not mine:
            return Item(label, f"n/a (not varied; {_assign(paths[:1], inputs.flat)} throughout)")
        return Item(label, _assign(mine, chosen))

    items = [pick(LR_PATHS, "Selected LR"), pick(BATCH_PATHS, "Selected batch size")]
    opt_paths = sorted(p for p in variables if p.startswith("optimizer.") and p not in LR_PATHS)
    used.update(opt_paths)
    items.append(Item("Selected optimizer", _assign(opt_paths, chosen) if opt_paths else
                      f"n/a (not varied; {fmt_value(inputs.flat.get('optimizer.name'))} "
                      "throughout)"))
    arch = sorted(p for p in variables if p.startswith("model."))
    used.update(arch)
    items.append(Item("Any architectural preference",
                      _assign(arch, chosen) if arch else "n/a (not varied)"))
    if rest := sorted(variables - used - PER_SEED_PATHS):
        items.append(Item("Other settings of the selected arm", _assign(rest, chosen)))
    provisional = inputs.verdict.overall != "supported"
    notes = [f"Best arm by {primary} ({inputs.direction} is better): {best}, "
             f"{metric_pm(inputs.arms[best], primary)}."]
    if (r := f.runner_up) is not None:
        t = r.test
        if r.separated is not None:
            notes.append(f"Over the runner-up {r.arm}: difference {t.diff:+.4g}, 95% CI "
                         f"[{t.ci_low:+.4g}, {t.ci_high:+.4g}], Welch p = {t.p:.3g} "
                         f"({'separated' if r.separated else 'NOT separated'} at 5%).")
        else:
            notes.append(f"Over the runner-up {r.arm}: difference {t.diff:+.4g}; {t.reason}, so "
                         "the ranking is not tested.")
    if provisional:
        notes.append(f"PROVISIONAL: the hypothesis verdict is {inputs.verdict.overall}; adopt "
                     "only after the follow-ups below.")
    return Decision(items, provisional, notes)
