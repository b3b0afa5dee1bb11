"""Curves over seeds: an arm's metric on a common x grid, for plotting (mean and min-max band)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmlab.analysis.records import RunRecord
from lmlab.analysis.summary import Experiment
from lmlab.names import Status
from lmlab.store import MetricRow


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
                  if r.status != Status.DIVERGED and (rows := rows_of(r))]
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


