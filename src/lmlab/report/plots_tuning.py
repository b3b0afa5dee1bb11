"""The nuisance sweeps' figure: per arm, the selection metric against the searched value (one
curve per arm, log axis for a log search), each tuning seed as a dot, diverged points marked at
the loss at initialisation, the selected value starred and the largest stable value ringed.
Drawn from :mod:`lmlab.analysis.tuning`; kept apart from :mod:`lmlab.report.plots`, which
imports it for its figure list."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D

from lmlab.analysis.tuning import Tuning

if TYPE_CHECKING:
    from lmlab.report.plots import Figure

KEY = "lr_sensitivity"


def sensitivity_figure(tuning: Tuning | None, colors: Mapping[str, Any], out: Path,
                       save: Any) -> Figure | None:
    """The sweep figure (``save``: :func:`lmlab.report.plots._save`), or None without a
    finished point to draw."""
    if tuning is None:
        return None
    path = next(iter(tuning.nuisance.search))
    log = tuning.nuisance.log_scale(path)
    drawn = False
    fig = MplFigure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    inits = [s.init_loss for s in tuning.sweeps.values() if s.init_loss is not None]
    finite = [v for s in tuning.sweeps.values() for p in s.points for v in p.values
              if math.isfinite(v)]
    if not finite:
        return None
    cap = max(inits) if inits else max(finite)
    for arm, s in tuning.sweeps.items():
        pts = [p for p in s.ordered(path) if p.finished and _numeric(p.point[path])]
        if not pts:
            continue
        drawn = True
        color = colors.get(arm, "C0")
        xs = [float(p.point[path]) for p in pts]
        ys = [min(p.score, cap) for p in pts]
        ax.plot(xs, ys, "-o", color=color, lw=1.6, ms=4, label=arm)
        for p, x in zip(pts, xs, strict=True):
            ok = [v for v in p.values if math.isfinite(v)]
            ax.plot([x] * len(ok), ok, ls="none", marker=".", ms=5, alpha=0.5, color=color)
            if p.diverged:
                ax.plot([x], [cap], ls="none", marker="X", ms=10, color=color, mec="black")
            if p.spiked and not p.diverged:
                ax.plot([x], [min(p.score, cap)], ls="none", marker="^", ms=9, mfc="none",
                        mec=color)
        if s.selected is not None and _numeric(s.selected.point.get(path)):
            ax.plot([float(s.selected.point[path])], [s.selected.score], ls="none", marker="*",
                    ms=16, color=color, mec="black")
        if s.largest_stable is not None:
            y = next(min(p.score, cap) for p in pts if float(p.point[path]) == s.largest_stable)
            ax.plot([s.largest_stable], [y], ls="none", marker="o", ms=13, mfc="none", mec=color,
                    mew=1.5)
    if not drawn:
        return None
    if log:
        ax.set_xscale("log")
    if inits:
        ax.axhline(cap, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(path + (" (log scale)" if log else ""))
    ax.set_ylabel(f"{tuning.nuisance.select} (tuning runs)")
    ax.set_title(f"Sensitivity to {path}, per arm")
    handles, _ = ax.get_legend_handles_labels()
    extra = [Line2D([], [], ls="none", marker="*", ms=12, color="grey", mec="black",
                    label="selected"),
             Line2D([], [], ls="none", marker="o", ms=11, mfc="none", mec="grey",
                    label="largest stable"),
             Line2D([], [], ls="none", marker="X", ms=9, color="grey", mec="black",
                    label="diverged (at the initial loss)"),
             Line2D([], [], ls="none", marker="^", ms=8, mfc="none", mec="grey",
                    label="spiked")]
    ax.legend(handles=[*handles, *extra], fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return save(fig, out, KEY, f"Sensitivity to {path} per arm (tuning runs)",
                f"Mean {tuning.nuisance.select} over the tuning seeds at each searched value "
                "(dots: single seeds); a diverged point is drawn at the loss at initialisation "
                "(dotted line), the cap of the LR sensitivity. Star: the value each arm "
                "selected; ring: its largest stable value. Confirmation runs are not drawn.")


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
