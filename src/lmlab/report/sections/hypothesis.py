"""Sections 1 and 2, Objective and Hypothesis: the spec's own words, and the machine-checkable
form of the prediction that section 9 judges."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.report.inputs import ReportInputs


@dataclass(frozen=True)
class Hypothesis:
    mechanism: str
    prediction: str
    falsification: str
    checks: list[str]


def objective(inputs: ReportInputs) -> str | None:
    return inputs.spec.objective if inputs.spec else None


def description(inputs: ReportInputs) -> str | None:
    return inputs.spec.meta.description if inputs.spec else None


def section(inputs: ReportInputs) -> Hypothesis | None:
    if not inputs.spec:
        return None
    h = inputs.spec.hypothesis
    return Hypothesis(h.mechanism, h.prediction, h.falsification,
                      [c.label() for c in h.checks])
