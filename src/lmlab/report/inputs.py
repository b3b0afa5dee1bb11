"""Everything a report section is written from, gathered once: the experiment as stored, its arm
summaries, the hypothesis verdict, the findings, the Memory / Systems addendum (when one is
wanted) and the figures. Each section of :mod:`lmlab.report.sections` is a function of one
:class:`ReportInputs`; none reads the store or computes a statistic of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lmlab.analysis.findings import Findings, find, memory_kind
from lmlab.analysis.summary import ArmSummary, Experiment, summarize_arms, varied_paths
from lmlab.analysis.systems import Addendum, systems_addendum
from lmlab.analysis.tuning import Tuning, judge_tuning
from lmlab.analysis.verdict import HypothesisVerdict, judge_experiment
from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.names import RUN_METRICS
from lmlab.report.format import memory_label
from lmlab.spec.expand import addendum_requested
from lmlab.spec.schema import Spec

if TYPE_CHECKING:  # plots imports matplotlib: not needed to print the addendum
    from lmlab.report.plots import Figure


@dataclass(frozen=True)
class ReportInputs:
    exp: Experiment
    arms: Mapping[str, ArmSummary]
    verdict: HypothesisVerdict
    findings: Findings
    primary: str  # the metric arms are ranked by (evaluation.primary_metric)
    direction: str  # "lower" or "higher" is better
    memory_kind: str  # cuda_allocated | rss | mixed
    memory_label: str  # the memory column's header: "Peak VRAM" only for CUDA memory
    addendum_wanted: bool
    addendum: Addendum | None  # None when not wanted, or when there is nothing to measure yet
    addendum_missing: str | None = None  # why a wanted addendum is None
    figures: Mapping[str, Figure] = field(default_factory=dict)
    tuning: Tuning | None = None  # the nuisance sweeps, when the spec tunes any

    @property
    def spec(self) -> Spec | None:
        return self.exp.spec

    @cached_property
    def flat(self) -> dict[str, Any]:
        """The first run's resolved config, flattened: the value of every setting the runs
        share (a varied one is an arm's: see ``varied``)."""
        return flatten(self.exp.runs[0].config) if self.exp.runs else {}

    @cached_property
    def varied(self) -> frozenset[str]:
        """Config paths whose value differs between runs (the seed excluded)."""
        return frozenset(varied_paths([r.config for r in self.exp.runs]))

    @cached_property
    def declared(self) -> frozenset[str]:
        """The independent variables the spec declares, derived ones included."""
        derived = self.spec.independent.derived if self.spec else {}
        return frozenset(self.exp.variables) | frozenset(derived)

    @cached_property
    def provenances(self) -> list[dict[str, Any]]:
        return [r.provenance for r in self.exp.runs if r.provenance]


def gather(exp: Experiment, *, addendum: bool | None = None,
           figures: Mapping[str, Figure] | None = None) -> ReportInputs:
    """The inputs of ``exp``'s report. ``addendum``: whether to compute the Memory / Systems
    addendum (None: when the spec asks for it)."""
    arms = summarize_arms(exp)
    verdict = judge_experiment(exp, arms)
    primary = exp.spec.evaluation.primary_metric if exp.spec else "final_val_loss"
    wanted = addendum if addendum is not None else (
        exp.spec is not None and addendum_requested(exp.spec))
    computed, missing = None, None
    if wanted:
        try:
            computed = systems_addendum(exp)
        except UserError as e:  # no runs yet, or none of the reference arm
            missing = e.message
    kind = memory_kind(exp)
    return ReportInputs(
        exp=exp, arms=arms, verdict=verdict, findings=find(exp, arms, verdict, primary),
        primary=primary, direction=RUN_METRICS[primary], memory_kind=kind,
        memory_label=memory_label(kind), addendum_wanted=wanted, addendum=computed,
        addendum_missing=missing, figures=dict(figures or {}), tuning=judge_tuning(exp))
