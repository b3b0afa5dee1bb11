"""What the report's figures show, read off the matplotlib figures themselves (captured as they
are saved): bar labels clear of their whiskers, every validation point in view, the
update/weight ratio drawn over the run; and the section texts around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure as MplFigure

from lmlab.analysis.curves import arm_curves
from lmlab.analysis.summary import load_experiment
from lmlab.report import plots, write_report
from lmlab.store import Store
from test_report import CLEAR_WIN, Arm, build_experiment


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, MplFigure]]:
    """A two-seed CPU experiment with a spike, its report written, every figure kept."""
    d = tmp_path_factory.mktemp("figures")
    arms = [CLEAR_WIN[0], Arm("lr3e-3", {"optimizer.lr": 3e-3}, [4.80, 4.81, 4.79], 20_500,
                              312 * 2**20, spikes={0: [25]})]
    build_experiment(d, arms)
    with Store.open(d) as store:  # seeds that differ in speed and memory: whiskers to clear
        for row in store.runs():
            if row["seed"] == 1:
                summary = dict(row["summary"], train_s=row["summary"]["train_s"] * 1.4,
                               peak_mem_bytes=row["summary"]["peak_mem_bytes"] * 1.1)
                store.set_status(row["run_id"], "completed", summary=summary)
    kept: dict[str, MplFigure] = {}
    save = plots._save

    def keep(fig: MplFigure, out: Path, key: str, title: str, caption: str) -> plots.Figure:
        kept[key] = fig
        return save(fig, out, key, title, caption)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", keep)
        write_report(d)
    return d, kept


def _axes(fig: MplFigure, title_start: str) -> Any:
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


def test_bar_labels_start_past_the_whisker_and_the_seeds(drawn) -> None:
    _, figs = drawn
    for ax in figs["speed_memory"].axes:
        assert ax.texts
        for text in ax.texts:
            x, y = text.get_position()
            # the ±1 std whisker of this bar, and its seeds' dots
            ends = [px for c in ax.collections for seg in c.get_segments() for px, py in seg
                    if py == y]
            ends += [px for line in ax.lines
                     for px, py in zip(line.get_xdata(), line.get_ydata(), strict=True) if py == y]
            assert ends and x >= max(ends), (ax.get_title(), text.get_text(), ends)


def test_every_validation_point_is_in_view(drawn) -> None:
    d, figs = drawn
    ax = _axes(figs["loss_tokens"], "Validation loss")
    low, high = ax.get_ylim()
    curves = arm_curves(load_experiment(d), "val_loss", "tokens")
    assert curves
    for curve in curves.values():
        # the first evaluation (step 0, the initial loss) included
        assert low <= np.nanmin(curve.mean) and np.nanmax(curve.mean) <= high
        assert curve.mean[0] == np.nanmax(curve.mean)
    # The dense train-loss panel still focuses past its steep start.
    train = _axes(figs["loss_tokens"], "Train loss")
    first = arm_curves(load_experiment(d), "train_loss", "tokens")["lr1e-3"].mean[0]
    assert train.get_ylim()[1] < first


def test_update_ratio_is_drawn_over_the_run(drawn) -> None:
    d, figs = drawn
    ax = _axes(figs["diagnostics"], "Update / weight ratio")
    assert "over the run" in ax.get_title() and ax.get_yscale() == "log"
    probes = sorted({r.tokens for run in load_experiment(d).runs
                     for r in run.curves["update_ratio/block.0"]})
    assert len(probes) == 3  # the synthetic runs probe at steps 20, 40, 60
    curves = [line for line in ax.lines if len(line.get_xdata()) > 1]
    # one curve per arm for the first, middle and last of the 4 blocks
    assert len(curves) == 2 * 3
    for line in curves:
        assert list(line.get_xdata()) == probes


def test_first_middle_last_blocks() -> None:
    blocks = [(i, f"update_ratio/block.{i}") for i in range(12)]
    assert [i for i, _ in plots._first_middle_last(blocks)] == [0, 5, 11]
    assert plots._first_middle_last(blocks[:2]) == blocks[:2]


def test_event_counts_are_worded_in_the_singular_and_plural(drawn, tmp_path) -> None:
    d, _ = drawn
    md = (d / "report.md").read_text(encoding="utf-8")
    assert "1 spike event (marked" in md and "1 spike events" not in md
    assert "0 NaN events and 0 divergence events" in md


def test_cpu_hardware_counts_cores_not_processors(drawn) -> None:
    d, _ = drawn
    md = (d / "report.md").read_text(encoding="utf-8")
    # build_experiment records a CPU run: model "Test CPU", 2 logical cores
    assert "Test CPU (CPU, 2 logical cores), device cpu" in md
    assert "2× Test CPU" not in md
