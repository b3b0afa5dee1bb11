"""Section 8's nuisance tuning (each arm's sweep, its selected value, the edge warning and what
``extend`` did about it, the largest stable value and the learning-rate sensitivity), section
9's answer to the template's question (does a larger batch allow a proportionally larger
learning rate?) and section 10's per-arm selections. Words only: every number comes from
:mod:`lmlab.analysis.tuning` through ``ReportInputs.tuning``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.analysis.tuning import ArmSweep, PowerLaw, Tuning
from lmlab.report.format import Question, Table, fmt_value
from lmlab.report.inputs import ReportInputs

if TYPE_CHECKING:
    from lmlab.report.plots import Figure

QUESTION = "Does increasing batch size allow a proportionally larger stable learning rate?"


@dataclass(frozen=True)
class TuningSection:
    intro: str
    sweep: Table  # one row per arm and searched point
    arms: Table  # one row per arm: selected, edge, largest stable, sensitivity, extensions
    notes: list[str]
    figure: Figure | None


def section(inputs: ReportInputs) -> TuningSection | None:
    t = inputs.tuning
    if t is None:
        return None
    n = t.nuisance
    paths = list(n.search)
    intro = (f"Tuned per arm (nuisance): {', '.join(paths)}, selected by the mean "
             f"{n.select} over the tuning seeds {', '.join(map(str, n.seeds))}"
             + (f", extended by up to {n.extend} point{'s' if n.extend != 1 else ''} beyond an "
                "edge" if n.extend else "")
             + ". These runs chose each arm's value; every statistic, check and the verdict "
             "above and below are computed from the confirmation runs alone (meta.seeds at the "
             "selected value), never from the runs the value was selected by.")
    rows = []
    for arm, s in t.sweeps.items():
        for p in s.ordered():
            rows.append([arm, _point(p.point), _values(p.values), _score(p.score),
                         _state(p, s), "" if p.first else "extension"])
    sweep = Table(["Arm", "Value", f"{n.select} per seed", "Mean", "Runs", "Search"], rows,
                  ["l", "l", "r", "r", "l", "l"])
    arm_rows = []
    for arm, s in t.sweeps.items():
        chosen = t.selected.get(arm) or (s.selected.point if s.selected else None)
        arm_rows.append([arm, _point(chosen) if chosen else "— (tuning not finished)",
                         _edge_text(s), fmt_value(s.largest_stable) if s.largest_stable
                         is not None else "none", _sensitivity(s), str(s.extended)])
    arms = Table(["Arm", "Selected", "Edge", f"Largest stable {paths[0]}", "LR sensitivity",
                  "Extensions"], arm_rows, ["l", "l", "l", "r", "r", "r"])
    return TuningSection(intro, sweep, arms, _notes(t), inputs.figures.get("lr_sensitivity"))


def _notes(t: Tuning) -> list[str]:
    out = []
    for arm, s in t.sweeps.items():
        for path, edge in s.edges.items():
            ext = [e for e in t.extensions if e["arm"] == arm]
            did = (f"extend added {len(ext)} point{'s' if len(ext) != 1 else ''} beyond it "
                   f"({', '.join(fmt_value(e['value']) for e in ext)}) and the best is still "
                   "there" if ext else "extend is 0, so no point was added" if not t.nuisance.extend
                   else "the next point could not be added")
            out.append(f"WARNING: {arm}'s selected {path} = {fmt_value(s.selected.point[path])} "
                       f"is the {'smallest' if edge == 'low' else 'largest'} value searched: "
                       f"its optimum may lie beyond the range ({did}). Widen the search or "
                       "raise extend before reading this arm's comparison as its best.")
        if s.finished and s.init_loss is None:
            out.append(f"{arm}: no validation at step 0, so the LR sensitivity (capped at the "
                       "loss at initialisation) is not defined.")
    for e in t.extensions:
        if not any(n.startswith(f"WARNING: {e['arm']}'s") for n in out):
            out.append(f"{e['arm']}: the best value {fmt_value(e['best_was'])} was on the "
                       f"{e['edge']} edge, so {e['path']} = {fmt_value(e['value'])} was added; "
                       "the optimum is now inside the range.")
    out.append("LR sensitivity (Wortsman et al. 2023): the mean over the first search of "
               "min(loss, loss at initialisation) − the best loss; smaller is more robust to "
               "the choice. Largest stable: the largest value whose tuning runs neither "
               "diverged nor spiked beyond the detector's threshold.")
    return out


def question(inputs: ReportInputs) -> Question | None:
    """Section 9's answer to the template's question, when the arms differ in batch size and
    the learning rate is tuned per arm."""
    t = inputs.tuning
    if t is None or t.scaling is None:
        return None
    if isinstance(t.scaling, str):
        return Question(QUESTION, [f"Not answered here: {t.scaling}."])
    selected, stable = t.scaling
    answers = [_law(selected, t)]
    answers.append(_law(stable, t) if stable is not None else
                   "Largest stable lr: not fitted (an arm had no stable value in the search).")
    per_arm = "; ".join(f"{a}: batch {fmt_value(int(selected.x[a]))}, optimum ≈ "
                        f"{selected.y[a]:.3g}" + (f", largest stable {stable.y[a]:.3g}"
                                                  if stable is not None else "")
                        for a in selected.x)
    answers.append(f"Per arm: {per_arm} (the optimum refined between grid points by a parabola "
                   "in log lr through the best point and its neighbours).")
    return Question(QUESTION, answers)


def _law(law: PowerLaw, t: Tuning) -> str:
    ci = (f"{100 * law.level:g}% interval [{law.ci[0]:.2f}, {law.ci[1]:.2f}] (bootstrap over "
          f"the {len(t.nuisance.seeds)} tuning seeds, {law.resamples} resamples)"
          if law.ci is not None else "no interval")
    rule = {"proportional": "PROPORTIONAL (exponent 1: the linear scaling rule)",
            "square root": "SQUARE ROOT (exponent 0.5)", "neither": "NEITHER 0.5 nor 1",
            "inconclusive": "INCONCLUSIVE"}[law.answer]
    text = (f"{law.what.capitalize()} ∝ batch^{law.exponent:.2f}, {ci}: {rule} — {law.reason}.")
    if law.censored:
        text += (f" Caution: for {', '.join(law.censored)} the value is at the edge of the "
                 "grid every arm ran, so the true one may lie beyond it and the exponent is "
                 "bounded, not measured.")
    return text


def selected_values(inputs: ReportInputs, paths: Sequence[str]) -> str | None:
    """Section 10's value of a tuned heading (Selected LR): each arm's selection."""
    t = inputs.tuning
    if t is None or not set(paths) & set(t.nuisance.search):
        return None
    tuned = [p for p in paths if p in t.nuisance.search]
    parts = []
    for arm in t.sweeps:
        point = t.selected.get(arm)
        if point is None:
            parts.append(f"{arm}: not selected yet")
        else:
            parts.append(f"{arm}: " + ", ".join(f"{p} = {fmt_value(point[p])}" for p in tuned))
    best = inputs.findings.best
    lead = f"tuned per arm — {'; '.join(parts)}"
    return lead + (f" (the best arm, {best}, at its own selection)" if best else "")


def _point(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{p.rsplit('.', 1)[-1]} = {fmt_value(v)}" for p, v in point.items())


def _values(values: Sequence[float]) -> str:
    return ", ".join("diverged" if v == math.inf else "—" if math.isnan(v) else f"{v:.4f}"
                     for v in values)


def _score(x: float) -> str:
    return "diverged" if x == math.inf else "—" if math.isnan(x) else f"{x:.4f}"


def _state(p: Any, s: ArmSweep) -> str:
    if not p.finished:
        return "not finished"
    marks = []
    if p.diverged:
        marks.append(f"{p.diverged} diverged")
    if p.spiked:
        marks.append(f"{p.spiked} spiked")
    if s.selected is not None and p.point == s.selected.point:
        marks.append("SELECTED")
    return ", ".join(marks) or "stable"


def _edge_text(s: ArmSweep) -> str:
    if not s.edges:
        return "inside the range" if s.selected is not None else "—"
    return "; ".join(f"{'low' if e == 'low' else 'high'} edge of {p}" for p, e in s.edges.items())


def _sensitivity(s: ArmSweep) -> str:
    return "—" if s.sensitivity is None else f"{s.sensitivity:.4f}"
