"""Curve statistics: one number per run read off a window of a logged curve, so that a
prediction about the shape of training ("the early gradient norm stays smaller", "fewer tokens
to reach a validation loss of 5.5", "no spikes before step 50") is a check like any other.

The window is on the comparison axis (``tokens``, ``step`` or ``wall_s`` of every row, the
x of every curve in the report); percentages are of the run's own budget on that axis. A window
``[a, b]`` holds the rows logged after ``a`` up to ``b``: a row at step s is what step s did,
so "the last 10%" of a 100-step run is steps 91-100 and ``steps: [0, 30]`` the first 30 steps
(with the step-0 evaluation, when the window starts at 0). Which runs have a value: a completed run always; a diverged run when it ran through
the whole window (its early gradient norms are measured, its "last 10%" is not); other runs
never. A run that never reaches a ``first_below`` / ``first_above`` threshold has no value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmlab.analysis.records import RunRecord
from lmlab.names import Status
from lmlab.spec.schema import CurveStat

# The budget field that measures a run on each axis (MetricRow field -> BudgetConfig field).
AXIS_BUDGET = {"tokens": "tokens", "step": "steps", "wall_s": "wall_clock_s"}


def budget_on_axis(run: RunRecord, x_key: str) -> float | None:
    value = (run.config.get("budget") or {}).get(AXIS_BUDGET[x_key])
    return float(value) if value is not None else None


def run_value(run: RunRecord, stat: CurveStat, x_key: str) -> float | None:
    """``stat`` of one run (None: nothing logged in the window, or the threshold never
    reached)."""
    lo, hi = stat.bounds(budget_on_axis(run, x_key))
    if stat.reduce == "count":
        return float(sum(1 for e in run.events
                         if e["kind"] == stat.metric and inside(e[x_key], lo, hi)))
    rows = [r for r in run.curves.get(stat.metric, []) if inside(getattr(r, x_key), lo, hi)]
    if stat.reduce in ("first_below", "first_above"):
        assert stat.threshold is not None
        below = stat.reduce == "first_below"
        hit = next((r for r in rows if math.isfinite(r.value) and
                    (r.value <= stat.threshold if below else r.value >= stat.threshold)), None)
        return float(getattr(hit, x_key)) if hit is not None else None
    values = np.array([r.value for r in rows], dtype=float)
    if not values.size or np.isnan(values).any():
        return None
    reduce = {"mean": np.mean, "min": np.min, "max": np.max,
              "first": lambda v: v[0], "last": lambda v: v[-1]}[stat.reduce]
    return float(reduce(values))


def inside(x: float, lo: float, hi: float) -> bool:
    """Whether a row at ``x`` belongs to the window (lo, hi] (and [0, hi] from the start)."""
    return (lo < x or x == lo == 0) and x <= hi


def covers(run: RunRecord, stat: CurveStat, x_key: str) -> bool:
    """Whether ``run`` trained through the whole window, so its value is what it measures."""
    if run.status == Status.COMPLETED:
        return True
    if run.status != Status.DIVERGED:
        return False
    _, hi = stat.bounds(budget_on_axis(run, x_key))
    reached = max((getattr(r, x_key) for rows in run.curves.values() for r in rows), default=0)
    return math.isfinite(hi) and reached >= hi and stat.reduce not in ("first_below",
                                                                      "first_above")


def arm_values(runs: Sequence[RunRecord], stat: CurveStat, x_key: str) -> list[tuple[int, float]]:
    """``(seed, value)`` of every run of one arm that has a value."""
    out = []
    for run in runs:
        if covers(run, stat, x_key) and (v := run_value(run, stat, x_key)) is not None:
            out.append((run.seed, v))
    return out
