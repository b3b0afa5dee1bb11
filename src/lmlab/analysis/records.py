"""Every run of an experiment, read back from the store: the one loader of a run's records, and
the one definition of each per-run quantity (``lmlab.names.RUN_METRICS``). The report, the seed
statistics, the Memory / Systems addendum, ``lmlab status`` and the exporters all read runs
through :func:`load_runs`; none derives a run's numbers on its own.

Definitions
- Progress (``steps``, ``tokens``, ``train_s``, ``wall_s``): from the run's summary once it has
  ended; while it runs (or after an interruption) from its last logged train-loss row, so
  ``wall_s`` is then the training seconds so far.
- Final metrics (``final_val_*``, ``final_train_loss``, ``test_loss``) are measured at the end of
  the budget, so only a *completed* run has them: the full-split validation at its last step,
  the mean train loss over its last 10% of steps, the test split after it. Any other run has
  ``None``; what it did measure is its ``last_eval`` (the last validation before it stopped) and
  ``stopped_at_step``. Reporting a diverged run's last pre-blow-up evaluation as its "final" loss
  would make an unstable arm look better than it is.
- Throughput: ``tokens_per_s`` is training tokens / training seconds over the whole run (the
  first steps, with their warm-up and compile time, included: what the run cost), and
  ``step_time_s`` is training seconds / steps. ``steady_tokens_per_s`` is the same from the end
  of the first log interval on, for questions about the steady state (torch.compile).
- ``peak_mem_bytes``: the peak over the whole run (every segment of a resumed run), CUDA
  allocated on a GPU, the process's resident set on CPU.
- ``*_events``: counts of events; ``max_grad_norm``: the largest global gradient norm before
  clipping, infinite when a step's was non-finite; ``min_val_loss``: the best validation loss.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmlab.names import (
    END_METRICS,
    EVAL_KEYS,
    EVENT_METRICS,
    GRAD_NORM,
    PEAK_MEM,
    RUN_METRICS,
    STEP_TIME,
    TEST,
    TRAIN_LOSS,
    VAL,
    VAL_LOSS,
    Role,
    Status,
    eval_metric,
)
from lmlab.store import MetricRow, Store, hardware_summary

# An arm's statistics include a run's value of a metric when the run measured it: completed runs
# always; diverged runs for what they measured before stopping (events, gradient norms, speed,
# memory, their best validation loss), never for END_METRICS. Failed, over-budget, interrupted
# and unfinished runs are left out of the statistics and counted by status instead.
MEASURED_THROUGH = frozenset({Status.COMPLETED, Status.DIVERGED})


@dataclass(frozen=True)
class Evaluation:
    """One validation evaluation: where it happened and its numbers (``EVAL_KEYS``)."""

    step: int
    tokens: int
    seconds: float
    values: dict[str, float]

    @property
    def loss(self) -> float:
        return self.values["loss"]


@dataclass
class RunRecord:
    """One (arm, seed) run as stored, with every per-run quantity defined once (``metrics``)."""

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
    steps: int = 0
    tokens: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0
    # None: not defined for this run (never measured, or a final metric of a run that did not
    # complete); NaN / inf: measured and non-finite.
    metrics: dict[str, float | None] = field(default_factory=dict)
    steady_tokens_per_s: float | None = None
    last_eval: Evaluation | None = None
    stopped_at_step: int | None = None  # the last step of a run that did not complete
    role: str = Role.CONFIRMATION  # a nuisance sweep's tuning run, or a confirmation run
    point: dict[str, Any] = field(default_factory=dict)  # a tuning run's nuisance values

    @property
    def completed(self) -> bool:
        return self.status == Status.COMPLETED

    def included(self, metric: str) -> bool:
        """Whether this run's value of ``metric`` belongs in its arm's statistics."""
        value = self.metrics.get(metric)
        if value is None or math.isnan(value):
            return False
        # An exploding gradient is the largest norm there is: keep it, so the arm's max is inf.
        if not math.isfinite(value) and not (metric == "max_grad_norm" and value > 0):
            return False
        return self.status in MEASURED_THROUGH and (self.completed or metric not in END_METRICS)

    def values(self, name: str) -> list[float]:
        return [r.value for r in self.curves.get(name, [])]

    @property
    def hardware(self) -> str | None:
        """The hardware the run recorded (its provenance), None before it started: what decides
        whether its speed and memory compare with another run's."""
        if not self.provenance:
            return None
        return f"{hardware_summary(self.provenance)}, device {self.provenance.get('device', '?')}"

    def event_counts(self) -> dict[str, int]:
        return dict(Counter(e["kind"] for e in self.events))


def mixed_hardware(runs: Iterable[RunRecord]) -> list[str]:
    """The distinct hardware ``runs`` recorded when there is more than one (else empty): their
    speed and memory are not comparable."""
    seen = sorted({r.hardware for r in runs if r.hardware is not None})
    return seen if len(seen) > 1 else []


def load_runs(store: Store, role: str | None = Role.CONFIRMATION) -> list[RunRecord]:
    """Every run in ``store`` of ``role`` (None: every role), in the plan's order, with its
    quantities computed. The default is the confirmation runs: what every statistic, verdict
    and table of arms is computed from; a nuisance sweep's tuning runs are read on purpose
    (``role=Role.TUNING``), never mixed in by accident."""
    out = []
    for row in store.runs():
        if role is not None and row.get("role", Role.CONFIRMATION) != role:
            continue
        rid = row["run_id"]
        run = RunRecord(run_id=rid, arm=row["arm"], seed=int(row["seed"]), status=row["status"],
                        config=row.get("config") or {}, provenance=row.get("provenance") or {},
                        summary=row.get("summary") or {}, error=row.get("error"),
                        curves=store.metrics(rid), events=store.events(rid),
                        role=row.get("role") or Role.CONFIRMATION, point=row.get("point") or {})
        _compute(run)
        out.append(run)
    return out


def _compute(run: RunRecord) -> None:
    s = run.summary
    train = run.curves.get(TRAIN_LOSS, [])
    last = train[-1] if train else None
    run.steps = int(s["steps"]) if "steps" in s else (last.step if last else 0)
    run.tokens = int(s["tokens"]) if "tokens" in s else (last.tokens if last else 0)
    run.train_s = float(s["train_s"]) if "train_s" in s else (last.wall_s if last else 0.0)
    run.wall_s = float(s["wall_s"]) if "wall_s" in s else run.train_s

    evals = evaluations(run)
    run.last_eval = evals[-1] if evals else None
    if not run.completed and (train or evals):
        run.stopped_at_step = run.steps

    m: dict[str, float | None] = dict.fromkeys(RUN_METRICS)
    if run.completed:
        final = run.last_eval
        for key in EVAL_KEYS:
            m[eval_metric("final_val", key)] = final.values.get(key) if final else None
        test = run.values(eval_metric(TEST, "loss"))
        m["test_loss"] = test[-1] if test else None
        m["final_train_loss"] = final_train_loss(run.values(TRAIN_LOSS))
    val = run.values(VAL_LOSS)
    finite = [v for v in val if math.isfinite(v)]
    m["min_val_loss"] = min(finite) if finite else (math.nan if val else None)
    if run.train_s > 0 and run.steps > 0:
        m["tokens_per_s"] = run.tokens / run.train_s
        m["step_time_s"] = run.train_s / run.steps
    peaks = [v for v in run.values(PEAK_MEM) if math.isfinite(v)]
    m["peak_mem_bytes"] = (float(s["peak_mem_bytes"]) if s.get("peak_mem_bytes") is not None
                           else max(peaks) if peaks else None)
    counts = run.event_counts()
    for metric, kind in EVENT_METRICS.items():
        m[metric] = float(counts.get(kind, 0))
    grads = run.values(GRAD_NORM)
    m["max_grad_norm"] = (max(g if math.isfinite(g) else math.inf for g in grads)
                          if grads else None)
    run.metrics = m
    run.steady_tokens_per_s = _steady_tokens_per_s(run.curves.get(STEP_TIME, []))


def evaluations(run: RunRecord, split: str = VAL) -> list[Evaluation]:
    """Every evaluation of ``split`` the run logged, in step order."""
    columns = {key: {r.step: r for r in run.curves.get(eval_metric(split, key), [])}
               for key in EVAL_KEYS}
    out = []
    for step, row in sorted(columns["loss"].items()):
        values = {key: col[step].value for key, col in columns.items() if step in col}
        out.append(Evaluation(step, row.tokens, row.wall_s, values))
    return out


def final_train_loss(losses: Sequence[float]) -> float | None:
    """Mean of the last 10% of per-step train losses (at least one): one step's loss is noisy."""
    if not losses:
        return None
    k = max(1, math.ceil(0.1 * len(losses)))
    return float(np.mean(losses[-k:]))


def _steady_tokens_per_s(marks: Sequence[MetricRow]) -> float | None:
    """Tokens per training second from the end of the first log interval to the end of the run
    (``marks``: the rows that close each log interval)."""
    if len(marks) < 2:
        return None
    first, last = marks[0], marks[-1]
    if last.wall_s <= first.wall_s or last.step <= first.step:
        return None
    return (last.tokens - first.tokens) / (last.wall_s - first.wall_s)


# -- lmlab status --------------------------------------------------------------------------------

STATUS_KEYS = ("run_id", "arm", "role", "point", "seed", "status", "steps", "tokens", "wall_s",
               "final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
               "tokens_per_s", "peak_mem_bytes", "optimizer_state_bytes", "stopped_at_step",
               "last_eval", "events")


def status_row(run: RunRecord) -> dict[str, Any]:
    """One run as ``lmlab status --json`` prints it (a stable interface: ``STATUS_KEYS``)."""
    last = run.last_eval
    return {
        "run_id": run.run_id, "arm": run.arm, "role": str(run.role), "point": run.point,
        "seed": run.seed, "status": str(run.status),
        "steps": run.steps, "tokens": run.tokens, "wall_s": run.wall_s,
        **{k: run.metrics[k] for k in ("final_val_loss", "final_val_ppl", "final_val_bpb",
                                       "final_val_word_ppl", "tokens_per_s", "peak_mem_bytes")},
        # Moments / momentum buffers held by the optimizer: what memory experiments compare.
        "optimizer_state_bytes": run.summary.get("optimizer_state_bytes"),
        "stopped_at_step": run.stopped_at_step,
        "last_eval": None if last is None else {
            "step": last.step, "tokens": last.tokens,
            **{eval_metric(VAL, k): v for k, v in last.values.items()}},
        "events": dict(sorted(run.event_counts().items())),
    }
