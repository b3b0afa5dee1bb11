"""One experiment's store, read back and aggregated over seeds: the numbers every report table,
verdict and plot is built from.

``load_experiment`` reads everything once (runs, metric curves, events, spec, plan, preflight,
systems addendum); ``summarize_arms`` turns it into one :class:`ArmSummary` per arm, with a
:class:`~lmlab.analysis.stats.Summary` over seeds for each metric in ``schema.METRICS``;
``arm_curves`` puts an arm's seeds on a common x grid for plotting.

Which seeds count. Completed runs always do. A diverged run stopped before the end of its budget,
so the quantities measured *at the end* (final validation metrics, final train loss, test loss)
do not exist for it: reporting the last evaluation before the blow-up as its "final" loss would
make an unstable arm look better than it is. Everything else a diverged run did measure (event
counts, the largest gradient norm, speed, memory, the best validation loss it reached) is
included, and the arm is flagged. Failed, over-budget, interrupted and unfinished runs are left
out of the statistics and counted in the status columns instead.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.analysis.stats import Summary, summarize
from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.spec.schema import METRICS, Spec
from lmlab.store import FILENAME, STATUSES, MetricRow, Store

# Measured at the end of the budget; undefined for a run that diverged before reaching it.
END_METRICS = frozenset({
    "final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
    "final_train_loss", "test_loss",
})
# Counts of events: every seed's value is an exact observation, not a noisy estimate.
COUNT_METRICS = frozenset(m for m in METRICS if m.endswith("_events"))
# Event kinds behind the *_events metrics.
_EVENT_OF = {"divergence_events": "divergence", "nan_events": "nan", "spike_events": "spike"}

# The comparison axis decides the x of every curve: equal tokens, equal optimizer steps or
# equal training seconds (MetricRow field names).
AXIS_X = {"equal_tokens": "tokens", "equal_steps": "step", "equal_wall_clock": "wall_s"}
X_LABEL = {"tokens": "tokens seen", "step": "optimizer steps", "wall_s": "training seconds"}

# summary.csv: metric columns (mean and std over the included seeds), then one count per status.
CSV_METRICS = ("final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
               "tokens_per_s", "peak_mem_bytes")


@dataclass
class RunRecord:
    """One (arm, seed) run as stored, plus its per-run metrics (``schema.METRICS``)."""

    run_id: str
    arm: str
    seed: int
    status: str
    config: dict[str, Any]
    provenance: dict[str, Any]
    summary: dict[str, Any]
    error: str | None
    curves: dict[str, list[MetricRow]]
    events: list[dict[str, Any]]
    # None: never measured (no rows); NaN/inf: measured and non-finite.
    metrics: dict[str, float | None] = field(default_factory=dict)

    def included(self, metric: str) -> bool:
        """Whether this run's value of ``metric`` belongs in its arm's statistics."""
        value = self.metrics.get(metric)
        if value is None or math.isnan(value):
            return False
        # An exploding gradient is the largest norm there is: keep it, so the arm's max is inf.
        if not math.isfinite(value) and not (metric == "max_grad_norm" and value > 0):
            return False
        if self.status == "completed":
            return True
        return self.status == "diverged" and metric not in END_METRICS


@dataclass
class Experiment:
    """Everything one experiment directory holds, decoded."""

    directory: Path
    name: str
    spec: Spec | None
    spec_record: dict[str, Any] | None
    plan: dict[str, Any] | None
    preflight: dict[str, Any] | None
    addendum: dict[str, Any] | None
    runs: list[RunRecord]
    arms: list[str]  # in plan order
    reference: str | None
    axis: str
    experiment_events: list[dict[str, Any]]

    @property
    def x_key(self) -> str:
        return AXIS_X.get(self.axis, "tokens")

    @property
    def variables(self) -> list[str]:
        """Dotted RunConfig paths varied on purpose: the plan's, else whatever differs."""
        if self.plan and self.plan.get("variables"):
            return list(self.plan["variables"])
        return varied_paths([r.config for r in self.runs])

    def arm_values(self, arm: str) -> dict[str, Any]:
        """The independent variables' values of one arm (the plan's, else its first run's)."""
        if self.plan:
            for planned in self.plan.get("runs", []):
                if planned.get("arm") == arm:
                    return dict(planned.get("values") or {})
        runs = [r for r in self.runs if r.arm == arm]
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


@dataclass
class Curve:
    """One arm's curve of one metric over seeds: ``mean`` and ``low``/``high`` (min and max over
    seeds, the honest band at 2-5 seeds) at each ``x``."""

    arm: str
    metric: str
    x_key: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_seeds: int


# -- reading the store ---------------------------------------------------------------------------


def load_experiment(directory: Path | str) -> Experiment:
    """Read one experiment directory's store. Raises UserError if there is none."""
    directory = Path(directory)
    if not (directory / FILENAME).is_file():
        raise UserError(f"no lmlab results here ({FILENAME} missing)", file=str(directory))
    with Store(directory / FILENAME) as store:
        spec_record = store.get_result("experiment/spec")
        spec = None
        if spec_record and spec_record.get("spec") is not None:
            try:
                spec = Spec.model_validate(spec_record["spec"])
            except ValueError as e:
                raise UserError(f"the stored spec does not validate with this lmlab: {e}",
                                file=str(directory / FILENAME), field="experiment/spec") from e
        plan = store.get_result("experiment/plan")
        runs = []
        for row in store.runs():
            rid = row["run_id"]
            run = RunRecord(
                run_id=rid, arm=row["arm"], seed=int(row["seed"]), status=row["status"],
                config=row.get("config") or {}, provenance=row.get("provenance") or {},
                summary=row.get("summary") or {}, error=row.get("error"),
                curves=store.metrics(rid), events=store.events(rid))
            run.metrics = run_metrics(run)
            runs.append(run)
        experiment_events = [e for e in store.events() if e["run_id"] is None]
        preflight = store.get_result("experiment/preflight")
        addendum = store.get_result("systems/addendum")

    arms: list[str] = []
    for arm in [p.get("arm") for p in (plan or {}).get("runs", [])] + [r.arm for r in runs]:
        if arm is not None and arm not in arms:
            arms.append(arm)
    reference = (plan or {}).get("reference")
    if reference is None and spec is not None:
        reference = spec.independent.reference
    if reference is None and arms:
        reference = arms[0]
    axis = (plan or {}).get("axis") or (spec.comparison_axis if spec else "equal_tokens")
    name = spec.meta.name if spec else directory.resolve().name
    return Experiment(directory, name, spec, spec_record, plan, preflight, addendum, runs, arms,
                      reference, axis, experiment_events)


def run_metrics(run: RunRecord) -> dict[str, float | None]:
    """Every ``schema.METRICS`` quantity of one run, from its summary, curves and events."""
    s, curves = run.summary, run.curves

    def from_summary(key: str, curve: str, pick: str = "last") -> float | None:
        if s.get(key) is not None:
            return float(s[key])
        values = _values(curves.get(curve))
        if not values:
            return None
        return values[-1] if pick == "last" else max(values)

    out: dict[str, float | None] = {}
    for name in ("val_loss", "val_ppl", "val_bpb", "val_word_ppl"):
        out[f"final_{name}"] = from_summary(f"final_{name}", name)
    out["test_loss"] = from_summary("test_loss", "test_loss")
    out["final_train_loss"] = final_train_loss(_values(curves.get("train_loss")))
    val = _values(curves.get("val_loss"))
    finite_val = [v for v in val if math.isfinite(v)]
    out["min_val_loss"] = min(finite_val) if finite_val else (math.nan if val else None)
    out["tokens_per_s"] = from_summary("tokens_per_s", "tokens_per_s")
    out["peak_mem_bytes"] = from_summary("peak_mem_bytes", "peak_mem_bytes", pick="max")
    step_times = _values(curves.get("step_time_s"))
    if step_times:
        out["step_time_s"] = float(np.mean(step_times))
    elif s.get("train_s") and s.get("steps"):
        out["step_time_s"] = float(s["train_s"]) / float(s["steps"])
    else:
        out["step_time_s"] = None
    counts = Counter(e["kind"] for e in run.events)
    for metric, kind in _EVENT_OF.items():
        out[metric] = float(counts.get(kind, 0))
    grads = _values(curves.get("grad_norm"))
    # A non-finite gradient norm is the largest one there is: inf, so the arm's max is inf too.
    out["max_grad_norm"] = (max(g if math.isfinite(g) else math.inf for g in grads)
                            if grads else None)
    return out


def final_train_loss(losses: Sequence[float]) -> float | None:
    """Mean of the last 10% of per-step train losses (at least one): one step's loss is noisy."""
    if not losses:
        return None
    k = max(1, math.ceil(0.1 * len(losses)))
    return float(np.mean(losses[-k:]))


def _values(rows: Sequence[MetricRow] | None) -> list[float]:
    return [r.value for r in rows] if rows else []


# -- aggregation over seeds ----------------------------------------------------------------------


def summarize_arms(exp: Experiment) -> dict[str, ArmSummary]:
    """One summary per arm, in plan order."""
    out = {}
    for arm in exp.arms:
        runs = exp.runs_of(arm)
        stats, values = {}, {}
        for metric in METRICS:
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


# -- curves --------------------------------------------------------------------------------------


def arm_curves(exp: Experiment, metric: str, x_key: str | None = None, max_points: int = 400,
               extract: Callable[[RunRecord], Sequence[MetricRow]] | None = None,
               ) -> dict[str, Curve]:
    """Each arm's ``metric`` over ``x_key`` (default: the comparison axis), mean and band over
    the seeds that did not diverge (diverged seeds are drawn on their own by the plots: folding a
    blow-up into the mean would hide both it and the healthy seeds).

    Seeds logged at the same x (tokens and steps usually are) are aggregated point by point.
    Otherwise (wall-clock, different lengths) each seed is put on a shared linear grid: dense
    curves (per-step train loss) by averaging the rows that fall in each grid cell, sparse ones
    (evaluations) by linear interpolation inside the seed's own range and NaN outside it, so a
    short seed never extends past its last point.

    ``extract`` derives the rows from a run instead of reading ``metric`` (a combined curve).
    """
    x_key = x_key or exp.x_key
    rows_of = extract or (lambda run: run.curves.get(metric, []))
    out = {}
    for arm in exp.arms:
        series = [_xy(rows, x_key) for r in exp.runs_of(arm)
                  if r.status != "diverged" and (rows := rows_of(r))]
        if series:
            out[arm] = _aggregate(arm, metric, x_key, series, max_points)
    return out


def combined_norm(run: RunRecord, prefix: str, contains: str = "") -> list[MetricRow]:
    """The root-sum-square, step by step, of every curve named ``prefix...`` whose name contains
    ``contains``: e.g. all LayerNorm weight-gradient norms as one norm."""
    names = [n for n in run.curves if n.startswith(prefix) and contains in n]
    by_step: dict[int, tuple[MetricRow, float]] = {}
    for name in names:
        for row in run.curves[name]:
            first, total = by_step.get(row.step, (row, 0.0))
            by_step[row.step] = (first, total + row.value**2)
    return [MetricRow(r.step, r.tokens, r.wall_s, math.sqrt(total))
            for _, (r, total) in sorted(by_step.items())]


def seed_curve(run: RunRecord, metric: str, x_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    rows = run.curves.get(metric)
    return _xy(rows, x_key) if rows else None


def _xy(rows: Sequence[MetricRow], x_key: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([getattr(r, x_key) for r in rows], dtype=float)
    y = np.array([r.value for r in rows], dtype=float)
    return x, y


def _aggregate(arm: str, metric: str, x_key: str, series: list[tuple[np.ndarray, np.ndarray]],
               max_points: int) -> Curve:
    first = series[0][0]
    shared = all(len(x) == len(first) and np.array_equal(x, first) for x, _ in series)
    if shared and len(first) <= max_points:
        grid = first
        stack = np.vstack([y for _, y in series])
    else:
        lo = min(float(x[0]) for x, _ in series)
        hi = max(float(x[-1]) for x, _ in series)
        n = min(max_points, max(len(x) for x, _ in series))
        grid = np.linspace(lo, hi, n) if hi > lo else np.array([lo])
        stack = np.vstack([_on_grid(x, y, grid) for x, y in series])
    valid = np.isfinite(stack)
    count = valid.sum(axis=0)
    # nan-aware reductions warn on all-NaN columns; those columns stay NaN (count 0) anyway.
    with np.errstate(invalid="ignore", divide="ignore"):
        masked = np.where(valid, stack, np.nan)
        mean = _nan_reduce(np.nanmean, masked, count)
        low = _nan_reduce(np.nanmin, masked, count)
        high = _nan_reduce(np.nanmax, masked, count)
    return Curve(arm, metric, x_key, grid, mean, low, high, len(series))


def _nan_reduce(fn: Any, stack: np.ndarray, count: np.ndarray) -> np.ndarray:
    out = np.full(stack.shape[1], np.nan)
    cols = count > 0
    if cols.any():
        out[cols] = fn(stack[:, cols], axis=0)
    return out


def _on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    out = np.full(len(grid), np.nan)
    if len(grid) == 1:
        out[0] = float(np.nanmean(y))
        return out
    if len(x) >= 2 * len(grid):
        # Dense: the mean of the rows in each cell (cells centred on the grid points).
        edges = np.concatenate(([-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]))
        cell = np.searchsorted(edges, x, side="right") - 1
        sums = np.bincount(cell, weights=np.where(np.isfinite(y), y, 0.0), minlength=len(grid))
        counts = np.bincount(cell, weights=np.isfinite(y).astype(float), minlength=len(grid))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(counts > 0, sums / counts, np.nan)
        # Cells beyond the seed's last row stay empty, like the interpolated case.
        out[(grid < x[0]) | (grid > x[-1])] = np.nan
        return out
    inside = (grid >= x[0]) & (grid <= x[-1])
    out[inside] = np.interp(grid[inside], x, y)
    return out


# -- configs -------------------------------------------------------------------------------------


# Differs between runs of one arm by design: never a controlled variable, never an arm's identity.
PER_SEED_PATHS = frozenset({"train.seed"})


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
    return _identity(a[0].config) == _identity(b[0].config)


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(config).items() if k not in PER_SEED_PATHS}


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value
