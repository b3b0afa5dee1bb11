"""Section 4, Independent Variable(s): each variable with the values its arms take, and each arm
with its values and how many runs it has."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.report.format import Table, fmt_value
from lmlab.report.inputs import ReportInputs


@dataclass(frozen=True)
class Independent:
    table: Table  # Variable | Values
    arms: Table  # Arm | one column per variable | Runs
    design: str


def section(inputs: ReportInputs) -> Independent:
    exp = inputs.exp
    variables = exp.variables
    values = {arm: exp.arm_values(arm) for arm in exp.arms}
    derived = inputs.spec.independent.derived if inputs.spec else {}
    rows = []
    for var in [*variables, *(p for p in derived if p not in variables)]:
        seen: list[str] = []
        for arm in exp.arms:
            text = fmt_value(values[arm].get(var))
            if text not in seen:
                seen.append(text)
        rows.append([var, ", ".join(seen) + (f" (derived: {derived[var]})"
                                             if var in derived else "")])
    arm_rows = [[arm + (" (reference)" if arm == exp.reference else "")]
                + [fmt_value(values[arm].get(v)) for v in variables]
                + [str(len(exp.runs_of(arm)))] for arm in exp.arms]
    return Independent(
        table=Table(["Variable", "Values"], rows),
        arms=Table(["Arm", *variables, "Runs"], arm_rows, ["l"] + ["r"] * len(variables) + ["r"]),
        design=_design_kind(inputs))


def _design_kind(inputs: ReportInputs) -> str:
    if not inputs.spec:
        return "arms as recorded in the store"
    ind = inputs.spec.independent
    kind = ("grid (every combination)" if ind.grid else "zip (values paired)" if ind.zip
            else "named arms")
    return f"{kind}; {len(inputs.exp.arms)} arms × {len(inputs.spec.meta.seeds)} seeds"
