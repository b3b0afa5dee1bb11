"""What the dashboard draws, as JSON: an experiment's runs table and its curves.

Nothing here computes a per-run quantity or formats a number on its own: a run's status row is
:func:`lmlab.analysis.records.status_row`, an arm's mean and band is
:func:`lmlab.analysis.curves.arm_curves` (what the report draws), a budget's progress is
:meth:`lmlab.config.BudgetConfig.progress`, numbers read as the report writes them
(:mod:`lmlab.report.format`) and arms have the report's colours
(:func:`lmlab.report.plots.arm_colors`). What is this module's own is the thinning of long
per-seed curves for drawing (:func:`thin`).

JSON has no NaN or infinity: a non-finite value on a curve becomes ``null`` (a gap in the line;
the run's events say what happened there), and the table carries the report's text for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from matplotlib.colors import to_hex

from lmlab.analysis.curves import arm_curves
from lmlab.analysis.findings import memory_kind
from lmlab.analysis.records import RunRecord, status_row
from lmlab.analysis.summary import AXIS_X, X_LABEL, Experiment
from lmlab.config import BudgetConfig
from lmlab.names import (
    GRAD_NORM,
    INSTABILITY_EVENTS,
    LR,
    PEAK_MEM,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    Status,
)
from lmlab.report.format import NA, fmt_value, integer, memory_label, mib, seconds, sig
from lmlab.report.plots import arm_colors

# The panels, in page order: (metric, title, y-axis label, unit the page formats values in).
PANELS: tuple[tuple[str, str, str, str], ...] = (
    (TRAIN_LOSS, "Train loss", "cross-entropy (nats/token)", "number"),
    (VAL_LOSS, "Validation loss", "cross-entropy (nats/token)", "number"),
    (GRAD_NORM, "Global gradient norm", "before clipping", "number"),
    (LR, "Learning rate", "first parameter group", "number"),
    (TOKENS_PER_S, "Throughput", "tokens / training second", "integer"),
    (PEAK_MEM, "Peak memory so far", "MiB", "bytes"),
)
# Per seed and per panel, at most about this many points reach the page by default: enough
# for a curve as wide as a screen; a zoomed-in view asks for more.
DEFAULT_POINTS = 1500
MAX_POINTS = 20_000


def thin(x: np.ndarray, y: np.ndarray, points: int) -> np.ndarray:
    """Indices of at most about ``points`` rows of a long curve, for drawing. Each bucket of
    consecutive rows keeps its lowest and its highest value (and its first non-finite one), so a
    loss spike or a blow-up stays visible, where a stride or a bucket mean would hide it."""
    n = len(y)
    if n <= points:
        return np.arange(n)
    k = math.ceil(n / max(1, points // 2))
    pad = (-n) % k
    padded = np.concatenate([y, np.full(pad, np.nan)]).reshape(-1, k)
    finite = np.isfinite(padded)
    base = np.arange(padded.shape[0]) * k
    keep = [base + np.argmin(np.where(finite, padded, np.inf), axis=1),
            base + np.argmax(np.where(finite, padded, -np.inf), axis=1)]
    bad = ~finite
    bad[-1, k - pad:] = False  # the padding is not a gap
    rows = bad.any(axis=1)
    keep.append((base + np.argmax(bad, axis=1))[rows])
    idx = np.unique(np.concatenate([*keep, [0, n - 1]]))
    return idx[idx < n]


def _json_floats(values: Iterable[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _x_values(x: np.ndarray, x_key: str) -> list[Any]:
    # Steps and tokens are integers; training seconds to the millisecond are plenty to draw.
    return [int(v) for v in x] if x_key != "wall_s" else [round(float(v), 3) for v in x]


def run_series(run: RunRecord, metric: str, x_key: str, points: int) -> list[list[Any]] | None:
    """One run's ``metric`` as ``[x, y]`` (thinned for drawing), or None if never logged."""
    rows = run.curves.get(metric)
    if not rows:
        return None
    x = np.array([getattr(r, x_key) for r in rows], dtype=float)
    y = np.array([r.value for r in rows], dtype=float)
    idx = thin(x, y, points)
    return [_x_values(x[idx], x_key), _json_floats(y[idx])]


def _events(run: RunRecord) -> list[dict[str, Any]]:
    """The stability events the train-loss panel marks, as the report's figures do."""
    out = []
    for e in run.events:
        if e["kind"] not in INSTABILITY_EVENTS:
            continue
        loss = (e.get("detail") or {}).get("loss")
        out.append({"kind": e["kind"], "step": e["step"], "tokens": e["tokens"],
                    "wall_s": e["wall_s"],
                    "loss": float(loss) if isinstance(loss, int | float) and math.isfinite(loss)
                    else None})
    return out


def _progress(run: RunRecord) -> float | None:
    """The fraction of its budget a run has done (the sweep's progress bars' definition)."""
    if run.status == Status.COMPLETED:
        return 1.0
    try:
        budget = BudgetConfig.model_validate(run.config.get("budget") or {})
    except ValueError:
        return None
    return budget.progress(run.steps, run.tokens, run.train_s)


def _error_line(run: RunRecord) -> str | None:
    """A failed run's error as the report's results section quotes it: the last line."""
    lines = (run.error or "").strip().splitlines()
    return lines[-1] if lines else None


def runs_table(exp: Experiment, colors: dict[str, str]) -> list[dict[str, Any]]:
    """One row per run: the ``lmlab status --json`` row, the cells as the report writes them
    (``text``), and what the page needs besides (colour, progress, last train loss, events)."""
    out = []
    for run in exp.runs:
        row = status_row(run)
        train = run.values(TRAIN_LOSS)
        last_train = train[-1] if train else None
        last_eval = run.last_eval.loss if run.last_eval else None
        progress = _progress(run)
        stopped = (f" at step {run.stopped_at_step:,}"
                   if run.stopped_at_step is not None and run.status != Status.RUNNING else "")
        events = row["events"]
        out.append({
            "run_id": run.run_id, "arm": run.arm, "seed": run.seed, "status": str(run.status),
            "color": colors.get(run.arm, "#777777"), "progress": progress,
            "error": _error_line(run), "events": events,
            "text": {
                "status": f"{run.status}{stopped}",
                "progress": NA if progress is None else f"{100 * progress:.0f}%",
                "steps": integer(row["steps"]), "tokens": integer(row["tokens"]),
                "train_loss": sig(last_train), "val_loss": sig(last_eval),
                "final_val_loss": sig(row["final_val_loss"]),
                "final_val_ppl": sig(row["final_val_ppl"]),
                "tokens_per_s": integer(row["tokens_per_s"]),
                "peak_mem": mib(row["peak_mem_bytes"]), "wall": seconds(row["wall_s"]),
                "events": ", ".join(f"{k}: {v}" for k, v in events.items()) or NA,
            },
            "instability": _events(run),
        })
    return out


def _arm_bands(exp: Experiment, metric: str, x_key: str, points: int) -> dict[str, Any]:
    out = {}
    for arm, c in arm_curves(exp, metric, x_key, max_points=points).items():
        out[arm] = {"n_seeds": c.n_seeds, "data": [
            _x_values(c.x, x_key), _json_floats(c.mean), _json_floats(c.low),
            _json_floats(c.high)]}
    return out


def experiment_payload(exp: Experiment, x_key: str | None = None,
                       points: int = DEFAULT_POINTS) -> dict[str, Any]:
    """Everything the experiment page shows, for curves against ``x_key`` (default: the
    comparison axis)."""
    x_key = x_key or exp.x_key
    colors = {arm: to_hex(c) for arm, c in arm_colors(exp.arms).items()}
    spec = exp.spec
    panels = []
    for metric, title, ylabel, unit in PANELS:
        series = {r.run_id: s for r in exp.runs if (s := run_series(r, metric, x_key, points))}
        if not series:
            continue
        panels.append({"metric": metric, "title": title, "ylabel": ylabel, "unit": unit,
                       "runs": series, "arms": _arm_bands(exp, metric, x_key, points)})
    statuses: dict[str, int] = {}
    for r in exp.runs:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "name": exp.name,
        "category": spec.meta.category if spec else None,
        "objective": spec.objective if spec else None,
        "prediction": spec.hypothesis.prediction if spec else None,
        "axis": exp.axis, "comparison_x": exp.x_key, "x_key": x_key, "x_label": X_LABEL[x_key],
        "x_axes": [{"key": k, "label": X_LABEL[k]} for k in dict.fromkeys(AXIS_X.values())],
        "reference": exp.reference, "variables": exp.variables,
        "arms": [{"name": arm, "color": colors[arm],
                  "values": {p: fmt_value(v) for p, v in exp.arm_values(arm).items()},
                  "runs": len(exp.runs_of(arm))} for arm in exp.arms],
        "preflight": None if exp.preflight is None else bool(exp.preflight.get("passed")),
        "memory_label": memory_label(memory_kind(exp)) if exp.runs else None,
        "statuses": statuses,
        "runs": runs_table(exp, colors),
        "panels": panels,
    }
