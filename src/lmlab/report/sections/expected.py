"""Section 7, Expected Outcomes: what the spec wrote down before anything ran."""

from __future__ import annotations

from lmlab.report.inputs import ReportInputs


def section(inputs: ReportInputs) -> list[str]:
    if not inputs.spec:
        return []
    e = inputs.spec.expected_outcomes
    return [e] if isinstance(e, str) else list(e)
