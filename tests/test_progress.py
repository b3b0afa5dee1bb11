"""Progress where there is no terminal (CI logs, nohup, Slurm files): one plain line per start,
per log interval and per end, never a silent run; a live bar on a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.progress import Progress

from lmlab.execute.progress import PlainProgress, clock, make_progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_prints_a_line_per_change_and_none_per_poll() -> None:
    out, now = io.StringIO(), Clock()
    with PlainProgress(out, now) as progress:
        task = progress.add_task("warmup-s0", total=1000, info="starting")
        for _ in range(5):  # the sweep polls every 0.2 s; nothing new, nothing printed
            progress.update(task, completed=0, info="starting")
        now.t += 30
        progress.update(task, completed=250, info="loss 5.123  3,400 tok/s")
        progress.update(task, completed=250, info="loss 5.123  3,400 tok/s")
        now.t += 90
        progress.update(task, completed=1000, info="completed")
    lines = out.getvalue().splitlines()
    assert lines == [
        "warmup-s0    0%  starting  0:00 elapsed",
        "warmup-s0   25%  loss 5.123  3,400 tok/s  0:30 elapsed, ~1:30 left",
        "warmup-s0  100%  completed  2:00 elapsed",
    ]


def test_plain_progress_counts_finished_runs_by_advance() -> None:
    out, now = io.StringIO(), Clock()
    progress = PlainProgress(out, now)
    overall = progress.add_task("experiment", total=4 * 1000, info="")
    now.t += 60
    progress.update(overall, advance=1000)
    assert out.getvalue().splitlines()[-1] == "experiment   25%  1:00 elapsed, ~3:00 left"


def test_clock() -> None:
    assert (clock(0), clock(65.4), clock(3 * 3600 + 9)) == ("0:00", "1:05", "3:00:09")


@pytest.mark.parametrize("choice, terminal, kind", [
    ("", False, PlainProgress), ("", True, Progress), ("plain", True, PlainProgress),
    ("rich", False, Progress), ("1", False, Progress), ("off", False, Progress),
])
def test_the_display_follows_the_terminal_unless_told(monkeypatch, choice, terminal, kind):
    monkeypatch.setenv("LMLAB_PROGRESS", choice)
    console = Console(file=io.StringIO(), force_terminal=terminal)
    progress = make_progress(console)
    assert isinstance(progress, kind)
    if choice == "off":
        assert progress.disable
