"""One module per section of the experiment template, each a function of one
:class:`~lmlab.report.inputs.ReportInputs` returning what the templates lay out (plain strings,
:class:`~lmlab.report.format.Item`, :class:`~lmlab.report.format.Table`): the Markdown and the
HTML report render the same content.

Nothing here is typed by hand: dates, commits and hardware come from the runs' provenance,
settings from the runs' own configs, numbers from :mod:`lmlab.analysis` (records, summaries,
verdicts, findings, the systems addendum).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lmlab.report.inputs import ReportInputs
from lmlab.report.sections import (
    addendum,
    controlled,
    decision,
    design,
    expected,
    followups,
    hypothesis,
    independent,
    interpretation,
    meta,
    metrics,
    notes,
    preflight,
    results,
    samples,
    tuning,
)


def context(inputs: ReportInputs) -> dict[str, Any]:
    """Every section's content, by the names the templates use."""
    exp = inputs.exp
    controlled_ = controlled.section(inputs)
    interpretation_ = interpretation.section(inputs)
    if (answer := tuning.question(inputs)) is not None:  # the template's own question
        interpretation_.questions.insert(1, answer)
    return {
        "title": exp.name,
        "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "directory": str(exp.directory),
        "no_spec": exp.spec is None,
        "meta": meta.section(inputs),
        "objective": hypothesis.objective(inputs),
        "description": hypothesis.description(inputs),
        "hypothesis": hypothesis.section(inputs),
        "controlled": controlled_.items,
        "controlled_warnings": controlled_.warnings,
        "independent": independent.section(inputs),
        "design": design.section(inputs),
        "metrics": metrics.section(inputs),
        "expected": expected.section(inputs),
        "results": results.section(inputs),
        "samples": samples.section(inputs),
        "interpretation": interpretation_,
        "tuning": tuning.section(inputs),
        "decision": decision.section(inputs),
        "notes": notes.section(inputs),
        "followups": followups.section(inputs),
        "preflight": preflight.section(inputs),
        "addendum": addendum.section(inputs),
    }
