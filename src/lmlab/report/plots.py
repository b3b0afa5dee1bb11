"""The report's figures, drawn from the store with matplotlib's Agg backend (no display needed).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), not pyplot:
no global figure registry to leak memory into, no backend to select before import, safe to call
from a process that already uses pyplot with another backend.

Every curve figure draws one line per arm (the mean over seeds that did not diverge) with a
min-max band over those seeds; diverged seeds are drawn on their own as thin dashed lines so a
blow-up is visible without dragging the arm's mean with it. Stability events (NaN, divergence,
loss spike) are marked on the train-loss panels where they happened.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from lmlab.analysis.curves import Curve, arm_curves, combined_norm, seed_curve
from lmlab.analysis.summary import X_LABEL, ArmSummary, Experiment
from lmlab.analysis.tuning import judge_tuning
from lmlab.names import (
    DIAG_ACT_RMS,
    DIAG_ATTN_ENTROPY,
    DIAG_BLOCK_GRAD,
    DIAG_NORM_GRAD,
    DIAG_UPDATE_RATIO,
    GRAD_NORM,
    PEAK_MEM,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    Event,
    Status,
)
from lmlab.report.plots_tuning import sensitivity_figure

DPI = 110
# One colour per arm, stable across every figure of a report.
_PALETTE = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
_EVENT_STYLE = {
    Event.SPIKE: {"marker": "^", "label": "loss spike"},
    Event.DIVERGENCE: {"marker": "X", "label": "divergence"},
    Event.NAN: {"marker": "*", "label": "NaN / non-finite (run stopped)"},
}
_BLOCK_STYLES = ["-", "--", ":", "-."]


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    path: Path


def arm_colors(arms: Sequence[str]) -> dict[str, Any]:
    return {arm: _PALETTE[i % len(_PALETTE)] for i, arm in enumerate(arms)}


def make_figures(exp: Experiment, arms: Mapping[str, ArmSummary], out: Path,
                 memory_label: str) -> dict[str, Figure]:
    """Draw every figure the data supports into ``out``; returns them by key, in report order."""
    from lmlab.report.seedplots import lr_figure, per_seed_figure  # they draw with these helpers

    out.mkdir(parents=True, exist_ok=True)
    colors = arm_colors(exp.arms)
    figures: dict[str, Figure] = {}
    makers = [
        lambda: _loss_figure(exp, colors, out, "tokens", "loss_tokens"),
        lambda: (_loss_figure(exp, colors, out, exp.x_key, f"loss_{exp.x_key}")
                 if exp.x_key != "tokens" else None),
        lambda: per_seed_figure(exp, colors, out),
        lambda: _grad_norm_figure(exp, colors, out),
        lambda: lr_figure(exp, colors, out),
        lambda: _speed_memory_figure(exp, arms, colors, out, memory_label),
        lambda: _diagnostics_figure(exp, colors, out),
        lambda: _preflight_figure(exp, out),
        lambda: sensitivity_figure(judge_tuning(exp), colors, out, _save),
    ]
    for make in makers:
        fig = make()
        if fig is not None:
            figures[fig.key] = fig
    return figures


# -- shared drawing helpers ----------------------------------------------------------------------


def _subplots(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[MplFigure, Any]:
    fig = MplFigure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: MplFigure, out: Path, key: str, title: str, caption: str) -> Figure:
    path = out / f"{key}.png"
    # Figure.savefig without pyplot renders with Agg for a .png path.
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return Figure(key, title, caption, path)


def _band(ax: Axes, curve: Curve, color: Any, label: str | None) -> None:
    ok = np.isfinite(curve.mean)
    ax.plot(curve.x[ok], curve.mean[ok], color=color, lw=1.6, label=label)
    if curve.n_seeds > 1:
        band = ok & np.isfinite(curve.low) & np.isfinite(curve.high)
        ax.fill_between(curve.x[band], curve.low[band], curve.high[band], color=color, alpha=0.18,
                        lw=0)


def _diverged_seeds(ax: Axes, exp: Experiment, metric: str, x_key: str,
                    colors: Mapping[str, Any]) -> bool:
    drew = False
    for run in exp.runs:
        if run.status != Status.DIVERGED:
            continue
        xy = seed_curve(run, metric, x_key)
        if xy is None:
            continue
        x, y = xy
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], color=colors[run.arm], lw=0.9, ls="--", alpha=0.8)
        drew = True
    return drew


def _event_markers(ax: Axes, exp: Experiment, x_key: str, colors: Mapping[str, Any],
                   curves: Mapping[str, Curve]) -> set[str]:
    """Mark stability events on a train-loss panel; returns the kinds drawn (for the legend)."""
    drawn: set[str] = set()
    for run in exp.runs:
        for event in run.events:
            style = _EVENT_STYLE.get(event["kind"])
            if style is None:
                continue
            x = float(event[x_key])
            y = event["detail"].get("loss")
            if y is None or not math.isfinite(float(y)):
                # A NaN loss has no height: put the marker on the arm's curve (or the top).
                # Interpolate over the finite cells only: a NaN cell would make y NaN.
                curve = curves.get(run.arm)
                ok = np.isfinite(curve.mean) if curve is not None else None
                y = (float(np.interp(x, curve.x[ok], curve.mean[ok]))
                     if curve is not None and ok is not None and ok.any()
                     else ax.get_ylim()[1])
            # A blow-up is far above the focused y-range: pin its marker to the top edge.
            lo, hi = ax.get_ylim()
            y = min(max(float(y), lo), hi)
            ax.plot([x], [y], ls="none", marker=style["marker"], ms=9, clip_on=False,
                    color=colors[run.arm], markeredgecolor="black", markeredgewidth=0.8,
                    zorder=5)
            drawn.add(event["kind"])
    return drawn


def _focus_ylim(ax: Axes, curves: Mapping[str, Curve], cut: float = 0.1) -> None:
    """Loss curves fall steeply at first; cut the first ``cut`` of the x-range off the
    y-limits so the part where arms differ is readable (the cut-off start is still drawn, off
    the top). ``cut=0`` keeps every point in view."""
    highs, lows = [], []
    for c in curves.values():
        ok = np.isfinite(c.mean)
        if not ok.any():
            continue
        x = c.x[ok]
        tail = x >= x[0] + cut * (x[-1] - x[0])
        top = (c.high if c.n_seeds > 1 else c.mean)[ok]
        bottom = (c.low if c.n_seeds > 1 else c.mean)[ok]
        highs.append(np.nanmax(top[tail]) if tail.any() else np.nanmax(top))
        lows.append(np.nanmin(bottom))
    if highs and np.isfinite(highs).all() and np.isfinite(lows).all():
        lo, hi = min(lows), max(highs)
        pad = 0.06 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-6
        ax.set_ylim(lo - pad, hi + pad)


def _log_y(ax: Axes) -> None:
    """Log y-axis labelled 0.5, 2, 30 rather than 5×10⁻¹: losses and norms read as numbers."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # Between decades only 2, 3 and 5 are labelled; all eight would collide.
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _wide(curves: Iterable[Curve]) -> bool:
    """Whether values span more than a factor of 20: a log axis then shows them all."""
    values = np.concatenate([c.high[np.isfinite(c.high)] for c in curves] or [np.array([])])
    values = values[values > 0]
    return values.size > 0 and float(values.max()) > 20 * float(values.min())


def _x_axis(ax: Axes, x_key: str) -> None:
    ax.set_xlabel(X_LABEL[x_key])
    ax.grid(alpha=0.3)
    if x_key == "tokens":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3), useMathText=True)


def _legend(fig: MplFigure, colors: Mapping[str, Any], arms: Sequence[str], extra: Sequence[
        Line2D] = (), ncol: int | None = None) -> None:
    handles = [Line2D([], [], color=colors[a], lw=2, label=a) for a in arms] + list(extra)
    ncol = ncol or min(len(handles), 5)
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    # Reserve the legend's height in inches, whatever the figure's height.
    bottom = (0.12 + 0.26 * rows) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))


def _event_handles(kinds: set[str], diverged: bool) -> list[Line2D]:
    out = [Line2D([], [], ls="none", marker=_EVENT_STYLE[k]["marker"], color="white",
                  markeredgecolor="black", ms=8, label=_EVENT_STYLE[k]["label"])
           for k in _EVENT_STYLE if k in kinds]
    if diverged:
        out.append(Line2D([], [], color="grey", ls="--", lw=1, label="diverged seed"))
    return out


# -- figures -------------------------------------------------------------------------------------


def _loss_figure(exp: Experiment, colors: Mapping[str, Any], out: Path, x_key: str,
                 key: str) -> Figure | None:
    train = arm_curves(exp, TRAIN_LOSS, x_key)
    val = arm_curves(exp, VAL_LOSS, x_key)
    if not train and not val:
        return None
    fig, grid = _subplots(1, 2, (12, 4.4))
    axes = grid[0]
    kinds: set[str] = set()
    diverged = False
    for ax, curves, metric, title in ((axes[0], train, TRAIN_LOSS, "Train loss"),
                                      (axes[1], val, VAL_LOSS, "Validation loss")):
        for arm, curve in curves.items():
            _band(ax, curve, colors[arm], arm)
            if metric == VAL_LOSS:  # a handful of evaluations: mark each one
                ok = np.isfinite(curve.mean)
                ax.plot(curve.x[ok], curve.mean[ok], ls="none", marker="o", ms=3,
                        color=colors[arm])
        # Train losses are dense and fall steeply: focus past the start. Validation points
        # are few, each a measurement (the first shows the initial loss): all stay in view.
        _focus_ylim(ax, curves, cut=0.1 if metric == TRAIN_LOSS else 0.0)
        diverged |= _diverged_seeds(ax, exp, metric, x_key, colors)
        if metric == TRAIN_LOSS:
            kinds = _event_markers(ax, exp, x_key, colors, curves)
        ax.set_title(f"{title} vs {X_LABEL[x_key]}")
        ax.set_ylabel("cross-entropy (nats/token)")
        _x_axis(ax, x_key)
    _legend(fig, colors, [a for a in exp.arms if a in train or a in val],
            _event_handles(kinds, diverged))
    what = X_LABEL[x_key]
    return _save(fig, out, key, f"Train and validation loss vs {what}",
                 f"Mean over seeds per arm, band = min–max over seeds; x = {what}. Per-step "
                 "train losses are averaged into bins when there are more steps than pixels. "
                 "Markers: stability events where they happened; dashed: seeds that diverged "
                 "(left out of the mean). The train-loss y-axis starts after the first 10% of the "
                 "run; the validation axis shows every evaluation (dots).")


def _grad_norm_figure(exp: Experiment, colors: Mapping[str, Any], out: Path) -> Figure | None:
    curves = arm_curves(exp, GRAD_NORM)
    if not curves:
        return None
    fig, grid = _subplots(1, 1, (12, 4))
    ax = grid[0, 0]
    for arm, curve in curves.items():
        _band(ax, curve, colors[arm], arm)
    diverged = _diverged_seeds(ax, exp, GRAD_NORM, exp.x_key, colors)
    clips = {(r.config.get("train") or {}).get("grad_clip") for r in exp.runs}
    clips.discard(None)
    extra = _event_handles(set(), diverged)
    if len(clips) == 1:
        clip = float(next(iter(clips)))
        ax.axhline(clip, color="black", lw=0.8, ls=":")
        extra.append(Line2D([], [], color="black", lw=0.8, ls=":", label=f"clip at {clip:g}"))
    if _wide(curves.values()):
        _log_y(ax)
    ax.set_ylabel("global gradient norm (before clipping)")
    ax.set_title(f"Global gradient norm vs {X_LABEL[exp.x_key]}")
    _x_axis(ax, exp.x_key)
    _legend(fig, colors, list(curves), extra)
    return _save(fig, out, "grad_norm", "Global gradient norm",
                 "Per step, before clipping; mean over seeds with min–max band (log scale when "
                 "the values span more than a factor of 20).")


def _speed_memory_figure(exp: Experiment, arms: Mapping[str, ArmSummary],
                         colors: Mapping[str, Any], out: Path, memory_label: str) -> Figure | None:
    panels = [(TOKENS_PER_S, "Throughput (tokens/sec, training time)", 1.0),
              (PEAK_MEM, f"{memory_label} (MiB)", 2.0**-20)]
    if not any(a.values[m] for a in arms.values() for m, _, _ in panels):
        return None
    names = [a for a in exp.arms if a in arms]
    fig, grid = _subplots(1, 2, (12, 0.9 + max(2.6, 0.45 * len(names))))
    for ax, (metric, title, scale) in zip(grid[0], panels, strict=True):
        for i, arm in enumerate(names):
            s = arms[arm].stats[metric]
            seeds = np.array(arms[arm].seeds_values(metric)) * scale
            if s.n == 0:
                continue
            err = s.std * scale if s.n > 1 else 0.0
            ax.barh(i, s.mean * scale, xerr=err, color=colors[arm], alpha=0.75, capsize=3)
            ax.plot(seeds, np.full(len(seeds), i), ls="none", marker="o", ms=4, color="black")
            # The label starts past the whisker and the seed dots, never on top of them.
            ends = [s.mean * scale + err, *seeds.tolist()]
            ax.text(max(v for v in ends if math.isfinite(v)), i, f"  {s.mean * scale:,.0f}",
                    va="center", ha="left", fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.25)
    fig.tight_layout()
    return _save(fig, out, "speed_memory", f"Tokens/sec and {memory_label} per arm",
                 "Bars: mean over seeds; whiskers: ±1 std; dots: individual seeds.")


_BLOCK = re.compile(r"\.(\d+)$")


def _indexed(names: Sequence[str], prefix: str) -> list[tuple[int, str]]:
    out = []
    for name in names:
        if name.startswith(prefix) and (m := _BLOCK.search(name)) and ".head." not in name:
            out.append((int(m.group(1)), name))
    return sorted(out)


def _diagnostics_figure(exp: Experiment, colors: Mapping[str, Any], out: Path) -> Figure | None:
    names = sorted({n for r in exp.runs for n in r.curves})
    panels = []
    act = _indexed(names, DIAG_ACT_RMS)
    if act:
        panels.append(("Activation RMS (probe batch)", lambda ax: _per_block_curves(
            ax, exp, colors, act, "RMS of the residual stream")))
    if any(n.startswith(DIAG_NORM_GRAD) for n in names):
        panels.append(("LayerNorm weight / bias gradient norms", lambda ax: _ln_curves(
            ax, exp, colors)))
    ent = _indexed(names, DIAG_ATTN_ENTROPY)
    if ent:
        panels.append(("Attention entropy per layer (last probe)", lambda ax: _per_layer(
            ax, exp, colors, ent, "last", "entropy (nats)", "layer")))
    blocks = _indexed(names, DIAG_BLOCK_GRAD)
    if blocks:
        panels.append(("Gradient norm per block (mean over the run)", lambda ax: _per_layer(
            ax, exp, colors, blocks, "mean", "gradient norm", "block")))
    ratio = _first_middle_last(_indexed(names, DIAG_UPDATE_RATIO))
    if ratio:
        # Over the run, not averaged: the first steps' ratios are ~30x the later ones and would
        # swamp a mean, hiding an ordering between arms that can reverse as training goes on.
        panels.append(("Update / weight ratio over the run", lambda ax: _per_block_curves(
            ax, exp, colors, ratio, "‖Δw‖ / ‖w‖ (log scale)", log=True)))
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = _subplots(rows, cols, (12, 3.8 * rows))
    for ax, (title, draw) in zip(axes.flat, panels, strict=False):
        styles = draw(ax)
        if styles:
            # Line styles mean different things per panel (block vs weight/bias): each panel
            # explains its own; colours (arms) are shared and explained once below.
            ax.legend(handles=styles, fontsize=8, frameon=False, loc="best")
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _legend(fig, colors, exp.arms)
    return _save(fig, out, "diagnostics", "Diagnostics",
                 "Probe-batch diagnostics logged every K steps: activation RMS of the first, "
                 "middle and last block; root-sum-square of the LayerNorm weight and bias "
                 "gradient norms; attention entropy per layer at the last probe; gradient norm "
                 "per block averaged over the run; the update/weight ratio of the first, middle "
                 "and last block at every probe. Curves: mean over seeds; per-layer panels: mean "
                 "over seeds with min–max whiskers.")


def _first_middle_last(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The first, middle and last of ``blocks`` (all of them when there are three or fewer):
    as many curves per arm as a panel can tell apart by line style."""
    if len(blocks) <= 3:
        return blocks
    return [blocks[0], blocks[(len(blocks) - 1) // 2], blocks[-1]]


def _per_block_curves(ax: Axes, exp: Experiment, colors: Mapping[str, Any],
                      blocks: list[tuple[int, str]], ylabel: str,
                      log: bool = False) -> list[Line2D]:
    handles = []
    for j, (index, name) in enumerate(blocks):
        style = _BLOCK_STYLES[j % len(_BLOCK_STYLES)]
        for arm, curve in arm_curves(exp, name).items():
            ok = np.isfinite(curve.mean)
            ax.plot(curve.x[ok], curve.mean[ok], color=colors[arm], ls=style, lw=1.4)
        handles.append(Line2D([], [], color="grey", ls=style, label=f"block {index}"))
    if log:
        _log_y(ax)
    ax.set_ylabel(ylabel)
    _x_axis(ax, exp.x_key)
    return handles


def _ln_curves(ax: Axes, exp: Experiment, colors: Mapping[str, Any]) -> list[Line2D]:
    handles = []
    for part, style in ((".weight", "-"), (".bias", "--")):
        curves = arm_curves(exp, f"norm_grad_norm{part}", extract=lambda r, p=part: combined_norm(
            r, DIAG_NORM_GRAD, p))
        for arm, curve in curves.items():
            ok = np.isfinite(curve.mean)
            ax.plot(curve.x[ok], curve.mean[ok], color=colors[arm], ls=style, lw=1.4)
        if curves:
            handles.append(Line2D([], [], color="grey", ls=style, label=f"norm{part} grads"))
    _log_y(ax)
    ax.set_ylabel("gradient norm (all norm layers)")
    _x_axis(ax, exp.x_key)
    return handles


def _per_layer(ax: Axes, exp: Experiment, colors: Mapping[str, Any],
               layers: list[tuple[int, str]], pick: str, ylabel: str,
               xlabel: str) -> list[Line2D]:
    index = [i for i, _ in layers]
    n_arms = max(len(exp.arms), 1)
    for k, arm in enumerate(exp.arms):
        per_seed = []
        for run in exp.runs_of(arm):
            if run.status == Status.DIVERGED:
                continue
            row = []
            for _, name in layers:
                values = [r.value for r in run.curves.get(name, []) if math.isfinite(r.value)]
                row.append((values[-1] if pick == "last" else float(np.mean(values)))
                           if values else math.nan)
            per_seed.append(row)
        if not per_seed:
            continue
        data = np.array(per_seed, dtype=float)
        with warnings.catch_warnings():  # a layer no seed logged stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(data, 0), np.nanmin(data, 0), np.nanmax(data, 0)
        # Arms side by side around each layer index, so whiskers do not hide each other.
        x = np.array(index) + (k - (n_arms - 1) / 2) * 0.4 / n_arms
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=colors[arm], marker="o", ms=4,
                    lw=1.2, capsize=2)
    ax.set_xticks(index)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return []


def _preflight_figure(exp: Experiment, out: Path) -> Figure | None:
    configs = [c for c in (exp.preflight or {}).get("configs", []) if c.get("losses")]
    if not configs:
        return None
    fig, grid = _subplots(1, 1, (12, 3.8))
    ax = grid[0, 0]
    thresholds = set()
    for i, cfg in enumerate(configs):
        losses = np.array(cfg["losses"], dtype=float)
        label = f"{cfg.get('key', i)} ({', '.join(cfg.get('arms', []))})"
        ax.plot(np.arange(1, len(losses) + 1), losses, color=_PALETTE[i % len(_PALETTE)],
                lw=1.4, label=label[:80])
        if cfg.get("threshold") is not None:
            thresholds.add(float(cfg["threshold"]))
    for t in thresholds:
        ax.axhline(t, color="black", ls=":", lw=1, label=f"pass threshold {t:g}")
    _log_y(ax)
    ax.set_xlabel("preflight step")
    ax.set_ylabel("train loss on the fixed slice")
    ax.set_title("Overfit sanity: loss on a tiny fixed slice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out, "preflight", "Preflight losses",
                 "Each configuration trains on the same few sequences; it passes when the loss "
                 "ends below the threshold with no NaNs and finite gradients.")
