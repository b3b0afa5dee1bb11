"""One experiment's store, read back and aggregated over seeds: the numbers every report table,
verdict and plot is built from.

``load_experiment`` reads everything once (runs through :mod:`lmlab.analysis.records`, spec,
plan, preflight); ``summarize_arms`` turns it into one :class:`ArmSummary` per arm, with a
:class:`~lmlab.analysis.stats.Summary` over the included seeds for each metric in
``names.RUN_METRICS`` (which seeds count: :meth:`RunRecord.included`).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.analysis.records import RunRecord, load_runs
from lmlab.analysis.stats import Summary, summarize
from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.identity import same
from lmlab.names import (
    PER_SEED_PATHS,
    RESULT_PLAN,
    RESULT_PREFLIGHT,
    RESULT_SEQUENTIAL,
    RESULT_SPEC,
    RESULT_TUNING,
    RUN_METRICS,
    STATUSES,
    STORE_FILE,
    Role,
)
from lmlab.spec.schema import Spec
from lmlab.store import Store
from lmlab.store import notes as read_notes
from lmlab.store import samples as read_samples

# The comparison axis decides the x of every curve: equal tokens, equal optimizer steps or
# equal training seconds (MetricRow field names).
AXIS_X = {"equal_tokens": "tokens", "equal_steps": "step", "equal_wall_clock": "wall_s"}
X_LABEL = {"tokens": "tokens seen", "step": "optimizer steps", "wall_s": "training seconds"}

# summary.csv: metric columns (mean and std over the included seeds), then one count per status.
CSV_METRICS = ("final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
               "tokens_per_s", "peak_mem_bytes")


@dataclass
class Experiment:
    """Everything one experiment directory holds, decoded."""

    directory: Path
    name: str
    spec: Spec | None
    spec_record: dict[str, Any] | None
    plan: dict[str, Any] | None
    preflight: dict[str, Any] | None
    runs: list[RunRecord]
    arms: list[str]  # in plan order
    reference: str | None
    axis: str
    experiment_events: list[dict[str, Any]]
    # An until-settled experiment's design, rounds and looks (``RESULT_SEQUENTIAL``); None for
    # a fixed design.
    sequential: dict[str, Any] | None = None
    # A nuisance sweep's tuning runs, kept apart from ``runs`` (the confirmation runs every
    # statistic reads), and the tuning record (``RESULT_TUNING``: points, extensions, selection).
    tuning: list[RunRecord] = field(default_factory=list)
    tuning_record: dict[str, Any] | None = None
    # The researcher's notes (``lmlab note``), oldest first, and each run's samples of its final
    # model (``lmlab.train.samples``), by run id: ``lmlab.store.notes``.
    notes: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def x_key(self) -> str:
        return AXIS_X.get(self.axis, "tokens")

    @property
    def variables(self) -> list[str]:
        """Dotted RunConfig paths varied on purpose: the plan's, else whatever differs."""
        if self.plan and self.plan.get("variables"):
            return list(self.plan["variables"])
        return varied_paths([r.config for r in self.runs])

    @property
    def planned(self) -> list[dict[str, Any]]:
        """The plan's confirmation runs (a nuisance sweep's tuning runs are planned too, and
        never counted with them)."""
        return [p for p in (self.plan or {}).get("runs", [])
                if p.get("role", Role.CONFIRMATION) == Role.CONFIRMATION]

    def arm_values(self, arm: str) -> dict[str, Any]:
        """The independent variables' values of one arm (the plan's, else its first run's)."""
        if self.plan:
            for planned in self.planned:
                if planned.get("arm") == arm:
                    return dict(planned.get("values") or {})
        runs = self.runs_of(arm)
        if not runs:
            return {}
        flat = flatten(runs[0].config)
        return {path: flat.get(path) for path in self.variables}

    def runs_of(self, arm: str) -> list[RunRecord]:
        return [r for r in self.runs if r.arm == arm]


@dataclass
class ArmSummary:
    arm: str
    runs: list[RunRecord]
    stats: dict[str, Summary]  # metric -> summary over the included seeds
    values: dict[str, list[tuple[int, float]]]  # metric -> [(seed, value)] that were included
    status_counts: dict[str, int]

    def seeds_values(self, metric: str) -> list[float]:
        return [v for _, v in self.values.get(metric, [])]


def load_experiment(directory: Path | str, store: Store | None = None) -> Experiment:
    """Read one experiment directory's store. Raises UserError if there is none.

    ``store``: read this one, already open (and left open), instead: ``lmlab serve`` reads
    through a read-only store beside a running sweep."""
    directory = Path(directory)
    with (Store.existing(directory) if store is None else nullcontext(store)) as store:
        spec_record = store.get_result(RESULT_SPEC)
        spec = None
        if spec_record and spec_record.get("spec") is not None:
            try:
                spec = Spec.model_validate(spec_record["spec"])
            except ValueError as e:
                raise UserError(f"the stored spec does not validate with this lmlab: {e}",
                                file=str(directory / STORE_FILE), field=RESULT_SPEC) from e
        plan = store.get_result(RESULT_PLAN)
        runs = load_runs(store)
        experiment_events = [e for e in store.events() if e["run_id"] is None]
        preflight = store.get_result(RESULT_PREFLIGHT)
        sequential = store.get_result(RESULT_SEQUENTIAL)
        tuning = load_runs(store, Role.TUNING)
        tuning_record = store.get_result(RESULT_TUNING)
        notes = read_notes(store)
        samples = {r.run_id: s for r in runs if (s := read_samples(store, r.run_id))}

    arms: list[str] = []
    for arm in [p.get("arm") for p in (plan or {}).get("runs", [])] + \
            [r.arm for r in [*tuning, *runs]]:
        if arm is not None and arm not in arms:
            arms.append(arm)
    reference = (plan or {}).get("reference")
    if reference is None and spec is not None:
        reference = spec.independent.reference
    if reference is None and arms:
        reference = arms[0]
    axis = (plan or {}).get("axis") or (spec.comparison_axis if spec else "equal_tokens")
    name = spec.meta.name if spec else directory.resolve().name
    return Experiment(directory, name, spec, spec_record, plan, preflight, runs, arms,
                      reference, axis, experiment_events, sequential, tuning, tuning_record,
                      notes, samples)


# -- aggregation over seeds ----------------------------------------------------------------------


def summarize_arms(exp: Experiment) -> dict[str, ArmSummary]:
    """One summary per arm, in plan order."""
    out = {}
    for arm in exp.arms:
        runs = exp.runs_of(arm)
        stats, values = {}, {}
        for metric in RUN_METRICS:
            kept = [(r.seed, float(r.metrics[metric])) for r in runs  # type: ignore[arg-type]
                    if r.included(metric)]
            values[metric] = kept
            # An infinite max_grad_norm makes the mean inf and the spread undefined (NaN).
            with np.errstate(invalid="ignore"):
                stats[metric] = summarize([v for _, v in kept])
        counts = Counter(r.status for r in runs)
        out[arm] = ArmSummary(arm, runs, stats, values, {s: counts.get(s, 0) for s in STATUSES})
    return out


def write_summary_csv(arms: Mapping[str, ArmSummary], path: Path) -> Path:
    """``summary.csv``: one row per arm; means and stds at full precision, blank if undefined."""
    header = ["arm", "n_runs", "n"]
    for metric in CSV_METRICS:
        header += [f"{metric}_mean", f"{metric}_std"]
    header += list(STATUSES)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for arm, a in arms.items():
            row: list[Any] = [arm, len(a.runs), a.stats["final_val_loss"].n]
            for metric in CSV_METRICS:
                s = a.stats[metric]
                row += [_csv_float(s.mean), _csv_float(s.std)]
            row += [a.status_counts[s] for s in STATUSES]
            writer.writerow(row)
    return path


def _csv_float(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ""


# -- configs -------------------------------------------------------------------------------------


def varied_paths(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config paths whose value is not the same in every run (the seed excluded)."""
    flats = [flatten(c) for c in configs]
    paths = sorted({p for f in flats for p in f} - PER_SEED_PATHS)
    return [p for p in paths if len({_hashable(f.get(p)) for f in flats}) > 1]


def same_config(exp: Experiment, arm_a: str, arm_b: str) -> bool:
    """Whether two arms ran the same configuration (up to the seed): an A/A comparison."""
    a, b = exp.runs_of(arm_a), exp.runs_of(arm_b)
    if not a or not b:
        return False
    return same(a[0].config, b[0].config, "arm")


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value
