"""Progress of ``lmlab run`` and ``lmlab train``: a live bar on a terminal, plain lines elsewhere.

A rich live display draws nothing when stderr is not a terminal, so under CI, ``nohup`` or
Slurm (output to a file) a sweep printed nothing for its whole length and looked hung. There,
:class:`PlainProgress` prints one line when a run starts, one per log interval (whenever the
run's reported state changes) and one when it ends, each flushed at once, like nanoGPT's
``print`` per log interval.

``LMLAB_PROGRESS`` chooses explicitly: ``rich`` (or ``1``), ``plain``, or ``off`` (or ``0``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

CHOICES = {"rich": "rich", "1": "rich", "plain": "plain", "off": "off", "0": "off"}


def make_progress(console: Console) -> ProgressDisplay:
    """The progress display for ``console`` (the executors' stderr console)."""
    choice = os.environ.get("LMLAB_PROGRESS", "").strip().lower()
    mode = CHOICES.get(choice) or ("rich" if console.is_terminal else "plain")
    if mode == "plain":
        return PlainProgress(console.file)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=mode == "off",
    )


def clock(seconds: float) -> str:
    """``1:05`` or ``2:03:09``: elapsed and remaining time as a log line writes it."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Task:
    description: str
    total: float
    completed: float
    info: str
    started: float
    printed: tuple[float, str] | None = None  # the state last printed


class PlainProgress:
    """The part of :class:`rich.progress.Progress` the executors use (``add_task``,
    ``update``, use as a context manager), writing one plain line per change of a task's
    progress or information instead of redrawing a bar."""

    def __init__(self, stream: TextIO | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._now = now
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0,
                 **fields: Any) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, float(total or 0.0), float(completed),
                                     str(fields.get("info", "")), self._now())
        self._emit(task_id)
        return task_id

    def update(self, task_id: int, *, completed: float | None = None,
               advance: float | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += float(advance)
        if "info" in fields:
            task.info = str(fields["info"])
        self._emit(task_id)

    def _emit(self, task_id: int) -> None:
        task = self._tasks[task_id]
        state = (task.completed, task.info)
        if state == task.printed:  # polled again with nothing new: say nothing
            return
        task.printed = state
        elapsed = self._now() - task.started
        frac = min(max(task.completed / task.total, 0.0), 1.0) if task.total else 0.0
        timing = f"{clock(elapsed)} elapsed"
        if 0.0 < frac < 1.0:
            timing += f", ~{clock(elapsed * (1 - frac) / frac)} left"
        parts = [f"{task.description}", f"{frac:4.0%}"]
        if task.info:
            parts.append(task.info)
        parts.append(timing)
        stream = self._stream or sys.stderr
        print("  ".join(parts), file=stream, flush=True)


ProgressDisplay = Progress | PlainProgress  # what make_progress returns
