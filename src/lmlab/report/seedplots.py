"""Figures besides the mean-and-band curves of :mod:`lmlab.report.plots`: the learning-rate
schedule each arm actually ran (the logged ``lr``, not the configured one: warmup, decay, a
wall-clock schedule's stretch all show as they happened), every seed's own loss curves, and the
overlay of two experiments that ``lmlab compare`` writes.

Drawn with the same helpers, colours and axis conventions as the report's other figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from lmlab.analysis.curves import arm_curves, seed_curve
from lmlab.analysis.summary import X_LABEL, Experiment
from lmlab.names import LR, TRAIN_LOSS, VAL_LOSS, Status
from lmlab.report.plots import (
    _PALETTE,
    Figure,
    _band,
    _focus_ylim,
    _legend,
    _save,
    _subplots,
    _x_axis,
)

# A seed's line style: seeds of one arm share its colour and differ in dash.
_SEED_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
MAX_POINTS = 2000  # per seed line: more points than pixels only slows the file down


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).round().astype(int))
    return x[keep], y[keep]


def lr_figure(exp: Experiment, colors: Mapping[str, Any], out: Path) -> Figure | None:
    """The logged learning rate per arm. Every seed of an arm is drawn: a schedule that does
    not depend on the seed draws one line, and one that does (a wall-clock schedule, a run that
    stopped early) shows where its seeds part."""
    runs = [r for r in exp.runs if r.curves.get(LR)]
    if not runs:
        return None
    fig, grid = _subplots(1, 1, (12, 3.8))
    ax = grid[0, 0]
    arms = []
    for run in runs:
        xy = seed_curve(run, LR, exp.x_key)
        if xy is None:
            continue
        x, y = _thin(*xy)
        ax.plot(x, y, color=colors[run.arm], lw=1.4, alpha=0.85,
                ls="--" if run.status == Status.DIVERGED else "-")
        if run.arm not in arms:
            arms.append(run.arm)
    ax.set_ylabel("learning rate (first parameter group)")
    ax.set_title(f"Learning rate applied vs {X_LABEL[exp.x_key]}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useMathText=True)
    _x_axis(ax, exp.x_key)
    _legend(fig, colors, [a for a in exp.arms if a in arms])
    return _save(fig, out, "lr_schedule", "Learning-rate schedule applied",
                 "The learning rate each run logged at every step (the optimizer's first "
                 "parameter group, after warmup and decay), one line per seed in its arm's "
                 "colour; seeds of one schedule overlap. Dashed: a diverged seed.")


def per_seed_figure(exp: Experiment, colors: Mapping[str, Any], out: Path) -> Figure | None:
    """Train and validation loss of every seed on its own, so a seed that behaves unlike the
    others is seen, not averaged away (the mean-and-band figure hides which seed is which)."""
    if not any(r.curves.get(TRAIN_LOSS) or r.curves.get(VAL_LOSS) for r in exp.runs):
        return None
    fig, grid = _subplots(1, 2, (12, 4.4))
    seeds = sorted({r.seed for r in exp.runs})
    style = {s: _SEED_STYLES[i % len(_SEED_STYLES)] for i, s in enumerate(seeds)}
    for ax, metric, title in ((grid[0, 0], TRAIN_LOSS, "Train loss"),
                              (grid[0, 1], VAL_LOSS, "Validation loss")):
        for run in exp.runs:
            xy = seed_curve(run, metric, exp.x_key)
            if xy is None:
                continue
            x, y = _thin(*xy)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], color=colors[run.arm], ls=style[run.seed], lw=1.1,
                    marker="o" if metric == VAL_LOSS else None, ms=2.5, alpha=0.9)
        _focus_ylim(ax, arm_curves(exp, metric, exp.x_key),
                    cut=0.1 if metric == TRAIN_LOSS else 0.0)
        ax.set_title(f"{title} per seed vs {X_LABEL[exp.x_key]}")
        ax.set_ylabel("cross-entropy (nats/token)")
        _x_axis(ax, exp.x_key)
    extra = [Line2D([], [], color="grey", ls=style[s], lw=1.2, label=f"seed {s}")
             for s in seeds] if len(seeds) > 1 else []
    _legend(fig, colors, [a for a in exp.arms if exp.runs_of(a)], extra)
    return _save(fig, out, "loss_per_seed", "Loss per seed",
                 "Every run's own train and validation loss (no averaging): colour = arm, dash = "
                 "seed, the same seed dashed alike in every arm. Diverged seeds included.")


def overlay_figure(exps: Sequence[Experiment], names: Sequence[str], x_key: str,
                   path: Path) -> Path | None:
    """Two (or more) experiments' train and validation loss on one pair of axes: each arm's
    mean with its min-max band over seeds, experiment by line style, arm by colour."""
    curves = [(arm_curves(e, TRAIN_LOSS, x_key), arm_curves(e, VAL_LOSS, x_key)) for e in exps]
    if not any(t or v for t, v in curves):
        return None
    fig, grid = _subplots(1, 2, (12, 4.6))
    handles, i = [], 0
    for (train, val), name, ls in zip(curves, names, ("-", "--", ":", "-."), strict=False):
        for arm in dict.fromkeys([*train, *val]):
            color = _PALETTE[i % len(_PALETTE)]
            i += 1
            for ax, c in ((grid[0, 0], train.get(arm)), (grid[0, 1], val.get(arm))):
                if c is None:
                    continue
                _band(ax, c, color, None)
                ax.lines[-1].set_linestyle(ls)
            handles.append(Line2D([], [], color=color, ls=ls, lw=2, label=f"{name}: {arm}"))
    for ax, title, k in ((grid[0, 0], "Train loss", 0), (grid[0, 1], "Validation loss", 1)):
        merged = {f"{j}/{a}": c for j, pair in enumerate(curves) for a, c in pair[k].items()}
        _focus_ylim(ax, merged, cut=0.1 if k == 0 else 0.0)
        ax.set_title(f"{title} vs {X_LABEL[x_key]}")
        ax.set_ylabel("cross-entropy (nats/token)")
        _x_axis(ax, x_key)
    _legend(fig, {}, [], handles, ncol=min(len(handles), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
