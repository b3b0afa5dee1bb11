"""Nuisance tuning, judged: which value each arm selects, whether it sits on an edge of the
search, how sensitive each arm is to it, and, for the template's own question, how the best
learning rate scales with the batch size. Pure functions of run records returning dataclasses;
the driver acts on them (selection, extension) and the report words them.

Definitions
- A point's **score**: the mean over the tuning seeds of the selection metric (``nuisance.
  select``, a validation metric); a point where any run diverged scores worst (it is not
  selectable), and an unfinished point has no score (tuning is not done).
- **Selected**: the best score (ties: the first point in search order).
- **Edge**: the selected value is the smallest or largest searched along a path: the optimum
  may lie beyond it (``extend`` adds points there, one at a time).
- **Largest stable value**: the largest value whose runs neither diverged (a non-finite step or a
  divergence event) nor spiked (a loss spike beyond the detector's threshold).
- **LR sensitivity** (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities"): the mean over the searched range of ``min(loss, loss at init) -
  best loss``; a diverged point counts at the loss at initialisation. Computed over the first
  search (the grid every arm ran), so that arms extended differently stay comparable.
- **Scaling exponent**: the slope of log(optimal lr) against log(batch size) over the arms, by
  least squares. Each arm's optimum is refined between grid points by a parabola through the
  best point and its neighbours in log lr (a grid argmin alone could only move in grid steps).
  Its interval comes from a bootstrap over the tuning seeds (resampled jointly across arms, so
  seed effects shared by the arms stay paired): the exponent ± t(n-1) x the bootstrap standard
  error widened by sqrt(n/(n-1)), n the tuning seeds. A plain percentile interval from a handful
  of seeds under-covers (77% at a nominal 90% with 6 seeds in the simulation test; this one
  holds its level there). The largest stable lr gets the same fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from lmlab.analysis.records import RunRecord
from lmlab.analysis.summary import Experiment
from lmlab.config import flatten
from lmlab.names import LR_PATHS, RUN_METRICS, VAL_LOSS, Status
from lmlab.spec.schema import Nuisance

UNSTABLE_STATUSES = frozenset({Status.DIVERGED})
# Lower bound on the resamples of the exponent's bootstrap; the percentile interval's Monte
# Carlo error at 2000 is ~0.5 points of coverage.
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class SweepPoint:
    """One nuisance point of one arm's tuning sweep, over its tuning seeds."""

    point: dict[str, Any]
    seeds: tuple[int, ...]
    run_ids: tuple[str, ...]
    values: tuple[float, ...]  # per seed: the selection metric (inf: diverged; nan: not ended)
    diverged: int  # runs that diverged
    spiked: int  # runs with at least one loss spike
    finished: bool  # every tuning seed has ended (completed or diverged)
    first: bool  # part of the first search (not an extension)
    unstable: tuple[bool, ...] = ()  # per seed: the run diverged or spiked

    @property
    def stable(self) -> bool:
        return self.finished and self.diverged == 0 and self.spiked == 0

    @property
    def score(self) -> float:
        """Mean over seeds; inf when a run diverged, nan while any run is unfinished."""
        if not self.finished or not self.values:
            return math.nan
        if any(not math.isfinite(v) for v in self.values):
            return math.inf
        return float(np.mean(self.values))


@dataclass(frozen=True)
class ArmSweep:
    """One arm's tuning sweep and what it selected."""

    arm: str
    paths: tuple[str, ...]
    log: dict[str, bool]  # path -> searched on a log scale
    points: list[SweepPoint]  # in search order, extensions last
    metric: str
    selected: SweepPoint | None  # None while tuning is unfinished, or when nothing is selectable
    edges: dict[str, str]  # path -> "low" / "high" where the selected value is on that edge
    largest_stable: float | None  # along the first path; None if no value was stable
    init_loss: float | None  # validation loss at step 0 (the cap of the sensitivity)
    sensitivity: float | None  # Wortsman et al. LR sensitivity over the first search

    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.points)

    @property
    def path(self) -> str:
        return self.paths[0]

    def ordered(self, path: str | None = None) -> list[SweepPoint]:
        """The points sorted by the value of ``path`` (default: the first path)."""
        path = path or self.path
        return sorted(self.points, key=lambda p: _key(p.point[path]))

    @property
    def extended(self) -> int:
        return sum(not p.first for p in self.points)


def sweep(runs: Sequence[RunRecord], arm: str, first: Sequence[Mapping[str, Any]],
          metric: str, log: Mapping[str, bool]) -> ArmSweep:
    """``arm``'s tuning sweep from its tuning runs (``first``: the points of the first search,
    the rest are extensions), the metric that selects and each path's scale."""
    mine = [r for r in runs if r.arm == arm]
    points: list[dict[str, Any]] = []
    for r in mine:
        if r.point not in points:
            points.append(dict(r.point))
    firsts = [dict(p) for p in first]
    points.sort(key=lambda p: firsts.index(p) if p in firsts else len(firsts))
    out = [_point(p, [r for r in mine if r.point == p], metric, p in firsts) for p in points]
    paths = tuple(points[0]) if points else tuple(log)
    selected = select(out, RUN_METRICS[metric])
    edges = edges_of(out, selected, paths)
    init = _init_loss(mine)
    return ArmSweep(arm, paths, dict(log), out, metric, selected, edges,
                    largest_stable(out, paths[0]) if paths else None, init,
                    lr_sensitivity([p for p in out if p.first], init))


def sweeps(runs: Sequence[RunRecord], arms: Sequence[str],
           nuisance: Nuisance) -> dict[str, ArmSweep]:
    """Every arm's sweep from the experiment's tuning runs."""
    log = {p: nuisance.log_scale(p) for p in nuisance.search}
    first = nuisance.points()
    return {a: sweep(runs, a, first, nuisance.select, log) for a in arms}


def _point(point: dict[str, Any], runs: Sequence[RunRecord], metric: str,
           first: bool) -> SweepPoint:
    runs = sorted(runs, key=lambda r: r.seed)
    values = []
    for r in runs:
        if r.status in UNSTABLE_STATUSES or (r.metrics.get("nan_events") or 0) > 0 or \
                (r.metrics.get("divergence_events") or 0) > 0:
            values.append(math.inf)
        elif r.completed and r.metrics.get(metric) is not None:
            v = float(r.metrics[metric])  # type: ignore[arg-type]
            values.append(v if math.isfinite(v) else math.inf)
        else:
            values.append(math.nan)
    finished = bool(runs) and not any(math.isnan(v) for v in values)
    diverged = sum(v == math.inf for v in values)
    spikes = [(r.metrics.get("spike_events") or 0) > 0 for r in runs]
    return SweepPoint(point, tuple(r.seed for r in runs), tuple(r.run_id for r in runs),
                      tuple(values), diverged, sum(spikes), finished, first,
                      tuple(v == math.inf or s for v, s in zip(values, spikes, strict=True)))


def select(points: Sequence[SweepPoint], direction: str = "lower") -> SweepPoint | None:
    """The best-scoring point (ties: the first in search order); None while any point is
    unfinished or when none has a finite score."""
    if not points or not all(p.finished for p in points):
        return None
    ok = [p for p in points if math.isfinite(p.score)]
    if not ok:
        return None
    sign = 1.0 if direction == "lower" else -1.0
    return min(ok, key=lambda p: sign * p.score)


def edges_of(points: Sequence[SweepPoint], selected: SweepPoint | None,
             paths: Sequence[str]) -> dict[str, str]:
    """Per path, whether the selected value is the smallest ("low") or largest ("high") value
    searched along it (a path searched at one value has no edge)."""
    if selected is None:
        return {}
    out = {}
    for path in paths:
        values = sorted({_key(p.point[path]) for p in points})
        if len(values) < 2:
            continue
        v = _key(selected.point[path])
        if v == values[0]:
            out[path] = "low"
        elif v == values[-1]:
            out[path] = "high"
    return out


def extension(values: Sequence[float], edge: str, log: bool, integer: bool = False) -> float | None:
    """The next value beyond ``edge`` of the searched ``values``, in the search's own spacing
    (log: the ratio of the two values at that edge; else their difference). None when a
    linear step would leave the positive values a positive search started from."""
    s = sorted(float(v) for v in values)
    if edge == "low":
        a, b = s[0], s[1]
        new = a * a / b if log else a - (b - a)
        if not log and a >= 0 > new:
            return None
    else:
        a, b = s[-2], s[-1]
        new = b * b / a if log else b + (b - a)
    if integer:
        new = float(round(new))
        if new in s:
            return None
    return float(f"{new:.6g}")


def largest_stable(points: Sequence[SweepPoint], path: str) -> float | None:
    """The largest value of ``path`` whose runs all ended without divergence or spikes."""
    stable = [float(p.point[path]) for p in points if p.stable and _numeric(p.point[path])]
    return max(stable) if stable else None


def lr_sensitivity(points: Sequence[SweepPoint], init_loss: float | None) -> float | None:
    """Wortsman et al. 2023: mean over the points of ``min(score, loss at init) - best``; a
    diverged point scores the loss at initialisation. None while unfinished or without a loss
    at initialisation."""
    if not points or init_loss is None or not all(p.finished for p in points):
        return None
    capped = [min(p.score, init_loss) for p in points]
    return float(np.mean(capped) - min(capped))


def _init_loss(runs: Sequence[RunRecord]) -> float | None:
    """The validation loss at step 0 (the evaluation before any update), over the runs."""
    first = [r.curves[VAL_LOSS][0].value for r in runs
             if r.curves.get(VAL_LOSS) and r.curves[VAL_LOSS][0].step == 0]
    first = [v for v in first if math.isfinite(v)]
    return float(np.mean(first)) if first else None


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _key(v: Any) -> Any:
    return (0, float(v), "") if _numeric(v) else (1, 0.0, repr(v))


# -- the template's question: does the best learning rate scale with the batch size? -------------


@dataclass(frozen=True)
class PowerLaw:
    """``y = c * x ** exponent`` over the arms, with the exponent's bootstrap interval."""

    what: str  # "selected lr" / "largest stable lr"
    x: dict[str, float]  # arm -> batch size (or tokens per step)
    y: dict[str, float]  # arm -> the value fitted
    exponent: float
    coefficient: float
    ci: tuple[float, float] | None  # None: one tuning seed (nothing to resample)
    level: float
    resamples: int
    censored: tuple[str, ...]  # arms whose value sits at an edge of the search
    answer: str  # "proportional" | "square root" | "neither" | "inconclusive"
    reason: str


def answer(ci: tuple[float, float] | None, exponent: float) -> tuple[str, str]:
    """Which scaling rule the exponent's interval supports: proportional (1) or square root
    (0.5) when it holds that value and excludes the other and 0 (no growth at all); neither
    when it excludes both; otherwise inconclusive (or when there is no interval)."""
    if ci is None:
        return "inconclusive", (f"exponent {exponent:.2f} with no interval (one tuning seed: "
                                "nothing to resample)")
    lo, hi = ci
    held = [v for v in (0.0, 0.5, 1.0) if lo <= v <= hi]
    if held == [1.0]:
        return "proportional", "the interval holds 1 and excludes 0.5 and 0"
    if held == [0.5]:
        return "square root", "the interval holds 0.5 and excludes 1 and 0"
    if 0.5 not in held and 1.0 not in held:
        where = "below" if hi < 0.5 else "above" if lo > 1 else "between"
        return "neither", f"the interval excludes both 0.5 and 1 (it lies {where} them)"
    return "inconclusive", (f"the interval holds {' and '.join(f'{v:g}' for v in held)}"
                            + (" (no growth with the batch size)" if 0.0 in held else "")
                            + ": more tuning seeds, arms or budget")


def optimum(log_x: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The refined argmin of ``scores`` (..., points) over the sorted grid ``log_x``: the vertex
    of the parabola through the best point and its neighbours, kept between the neighbours; an
    edge point (or a non-convex triple) gives the grid point itself."""
    scores = np.asarray(scores, dtype=float)
    i = np.nanargmin(np.where(np.isfinite(scores), scores, np.inf), axis=-1)
    n = scores.shape[-1]
    inner = (i > 0) & (i < n - 1)
    j = np.clip(i, 1, n - 2)
    take = np.take_along_axis
    y0 = take(scores, (j - 1)[..., None], -1)[..., 0]
    y1 = take(scores, j[..., None], -1)[..., 0]
    y2 = take(scores, (j + 1)[..., None], -1)[..., 0]
    x0, x1, x2 = log_x[j - 1], log_x[j], log_x[j + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # Vertex of the parabola through three (possibly unevenly spaced) points.
        num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        vertex = x1 - 0.5 * num / den
    ok = inner & np.isfinite(vertex) & np.isfinite(y0) & np.isfinite(y2) & (den != 0) & \
        ((y0 - y1) >= 0) & ((y2 - y1) >= 0)
    vertex = np.clip(vertex, x0, x2)
    return np.where(ok, vertex, log_x[i])


def _slope(log_b: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """Least-squares slope of log_y (..., arms) on log_b (arms)."""
    xc = log_b - log_b.mean()
    return ((log_y - log_y.mean(axis=-1, keepdims=True)) * xc).sum(-1) / (xc ** 2).sum()


def fit_optimum_scaling(batch: Sequence[float], lrs: Sequence[float], losses: np.ndarray,
                        unstable: np.ndarray | None = None, *, init_loss: float | None = None,
                        level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                        rng: np.random.Generator | None = None,
                        labels: Sequence[str] | None = None) -> tuple[PowerLaw, PowerLaw | None]:
    """The selected-lr and largest-stable-lr power laws in the batch size.

    ``losses``: (arms, lrs, seeds), inf where a run diverged; ``lrs``: the grid, ascending,
    the same for every arm (an extension only one arm got is not used: the fit needs one grid);
    ``unstable``: (arms, lrs, seeds) booleans, a run that diverged or spiked. Seeds are
    resampled jointly across arms."""
    rng = rng or np.random.default_rng(0)
    labels = list(labels or [str(b) for b in batch])
    log_b, log_x = np.log(np.asarray(batch, float)), np.log(np.asarray(lrs, float))
    losses = np.asarray(losses, float)
    cap = init_loss if init_loss is not None else np.nanmax(losses[np.isfinite(losses)])
    capped = np.minimum(np.where(np.isfinite(losses), losses, np.inf), cap)
    n_seeds = losses.shape[-1]
    idx = rng.integers(0, n_seeds, size=(resamples, n_seeds)) if n_seeds > 1 else None

    def law(what: str, point: np.ndarray, boot: np.ndarray | None,
            censored: list[str]) -> PowerLaw:
        e = float(_slope(log_b, point))
        c = float(np.exp(np.mean(point) - e * np.mean(log_b)))
        ci = None
        if boot is not None and len(boot) > 1:
            # The bootstrap's spread, widened for the few seeds it resamples: its variance
            # is (n-1)/n of the estimator's, and the t quantile on n-1 degrees of freedom
            # carries the uncertainty of the spread itself (percentile intervals from a
            # handful of seeds under-cover: ~77% at a nominal 90% with 6 seeds).
            se = float(np.std(boot, ddof=1)) * math.sqrt(n_seeds / (n_seeds - 1))
            half = float(scipy_stats.t.ppf(0.5 + level / 2, n_seeds - 1)) * se
            ci = (e - half, e + half)
        verdict, reason = answer(ci, e)
        return PowerLaw(what, dict(zip(labels, map(float, batch), strict=True)),
                        dict(zip(labels, map(float, np.exp(point)), strict=True)), e, c, ci,
                        level, resamples if boot is not None else 0, tuple(censored),
                        verdict, reason)

    mean = capped.mean(-1)
    best = optimum(log_x, mean)
    edge = [lab for lab, k in zip(labels, np.nanargmin(mean, -1), strict=True)
            if k in (0, len(lrs) - 1)]
    boot = None
    if idx is not None:
        # (resamples, arms, lrs): each resample's mean over its drawn seeds
        drawn = capped[:, :, idx].transpose(2, 0, 1, 3).mean(-1)
        boot = _slope(log_b, optimum(log_x, drawn))
    selected = law("selected lr", best, boot, edge)

    stable_law = None
    if unstable is not None:
        unstable = np.asarray(unstable, bool)
        top = _largest_stable_index(unstable.any(-1))
        if (top >= 0).all():
            point = log_x[top]
            censored = [lab for lab, k in zip(labels, top, strict=True) if k == len(lrs) - 1]
            sboot = None
            if idx is not None:
                drawn_u = unstable[:, :, idx].transpose(2, 0, 1, 3).any(-1)
                tops = _largest_stable_index(drawn_u)
                valid = (tops >= 0).all(-1)
                if valid.any():
                    sboot = _slope(log_b, log_x[np.where(tops >= 0, tops, 0)])[valid]
            stable_law = law("largest stable lr", point, sboot, censored)
    return selected, stable_law


def _largest_stable_index(unstable: np.ndarray) -> np.ndarray:
    """Per arm (..., arms, lrs -> ..., arms): the index of the largest lr with no unstable run;
    -1 when none."""
    stable = ~unstable
    n = stable.shape[-1]
    rev = np.flip(stable, -1)
    first = np.argmax(rev, -1)
    return np.where(stable.any(-1), n - 1 - first, -1)


def scaling_question(sweeps: Mapping[str, ArmSweep], batch: Mapping[str, float],
                     level: float) -> tuple[PowerLaw, PowerLaw | None] | str:
    """The template's question on this experiment's sweeps: the selected and largest stable
    lr against ``batch`` (arm -> batch size or tokens per step). A string says why it cannot
    be answered here."""
    arms = [a for a in sweeps if a in batch]
    if len({batch[a] for a in arms}) < 2:
        return "the arms do not differ in batch size"
    if any(not sweeps[a].finished for a in arms):
        return "tuning is not finished"
    path = sweeps[arms[0]].path
    # One grid for every arm: the values all of them ran (extensions included where every arm
    # got the same ones), at least the first search.
    common = set.intersection(*({float(p.point[path]) for p in sweeps[a].points} for a in arms))
    lrs = sorted(common)
    if not {float(p.point[path]) for p in sweeps[arms[0]].points if p.first} <= common:
        return "the arms searched different learning rates"
    seeds = sweeps[arms[0]].points[0].seeds
    if any(p.seeds != seeds for a in arms for p in sweeps[a].points):
        return "the arms' tuning runs did not all run the same seeds"
    losses, unstable = [], []
    for a in arms:
        by = {float(p.point[path]): p for p in sweeps[a].points}
        losses.append([list(by[x].values) for x in lrs])
        unstable.append([list(by[x].unstable) for x in lrs])
    inits = [s.init_loss for s in sweeps.values() if s.init_loss is not None]
    return fit_optimum_scaling([batch[a] for a in arms], lrs, np.array(losses),
                               np.array(unstable), init_loss=float(np.mean(inits)) if inits
                               else None, level=level, labels=arms)


# -- one experiment's tuning, judged ------------------------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """An experiment's nuisance tuning: each arm's sweep, the selection the driver recorded,
    the extensions it made, and (when the arms differ in batch size and the learning rate is
    tuned) the scaling question's fits, or why it cannot be answered."""

    nuisance: Nuisance
    sweeps: dict[str, ArmSweep]
    selected: dict[str, dict[str, Any]]  # the driver's recorded selection ({} while tuning)
    extensions: list[dict[str, Any]]
    batch: dict[str, float]  # arm -> sequences per optimizer step (when the arms differ in it)
    scaling: tuple[PowerLaw, PowerLaw | None] | str | None  # None: not the question here

    @property
    def lr_path(self) -> str | None:
        return next((p for p in self.nuisance.search if p in LR_PATHS), None)


def judge_tuning(exp: Experiment) -> Tuning | None:
    """The tuning phase of ``exp``; None when its spec has no nuisance variables."""
    spec = exp.spec
    if spec is None or spec.independent.nuisance is None:
        return None
    nuisance = spec.independent.nuisance
    judged = sweeps(exp.tuning, exp.arms, nuisance)
    record = exp.tuning_record or {}
    batch: dict[str, float] = {}
    for arm in exp.arms:
        runs = [r for r in exp.tuning if r.arm == arm] or exp.runs_of(arm)
        if runs:
            batch[arm] = float(flatten(runs[0].config).get("train.batch_size") or 0)
    scaling: tuple[PowerLaw, PowerLaw | None] | str | None = None
    lr = next((p for p in nuisance.search if p in LR_PATHS), None)
    if lr is not None and len(set(batch.values())) > 1:
        scaling = ("more than one variable is tuned: the fit needs the learning rate alone"
                   if len(nuisance.search) > 1 else
                   "the learning rate is not searched on a log scale"
                   if not nuisance.log_scale(lr) else
                   scaling_question(judged, batch, 1 - spec.analysis.alpha))
    return Tuning(nuisance, judged, dict(record.get("selected") or {}),
                  list(record.get("extensions") or []), batch, scaling)
