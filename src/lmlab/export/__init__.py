"""Export an experiment's store to the trackers researchers already use.

The store stays the source of truth; an export is a one-way copy made afterwards, so a tracker
being down never costs a run anything. Each exporter writes every run with its resolved config,
every metric row at its optimizer step (tokens seen are exported as a metric of their own, so
either can be the x-axis), the events and the run summary.

    lmlab export DIR --to tensorboard|wandb|mlflow [--dest PATH]

TensorBoard, W&B and MLflow are optional dependencies (``pip install 'lmlab[tracking]'``).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.analysis.records import load_runs, status_row
from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.names import RESULT_SPEC
from lmlab.store import Store

TARGETS = ("tensorboard", "wandb", "mlflow")


@dataclass
class RunExport:
    run_id: str
    arm: str
    seed: int
    status: str
    params: dict[str, Any]  # the resolved config, flattened to dotted paths
    by_step: dict[int, dict[str, float]]  # step -> {metric: value}, "tokens" included
    events: list[dict[str, Any]]
    summary: dict[str, Any]


def experiment_name(store: Store, out_dir: Path) -> str:
    spec = store.get_result(RESULT_SPEC)
    return spec["spec"]["meta"]["name"] if spec else out_dir.resolve().name


def iter_runs(store: Store) -> Iterator[RunExport]:
    """Every run, with its summary as the status JSON defines it (final metrics only for a
    completed run, ``stopped_at_step`` and the last evaluation otherwise)."""
    for run in load_runs(store):
        by_step: dict[int, dict[str, float]] = defaultdict(dict)
        for name, rows in run.curves.items():
            for r in rows:
                by_step[r.step][name] = r.value
                by_step[r.step]["tokens"] = float(r.tokens)
        summary = {k: v for k, v in status_row(run).items()
                   if k not in ("run_id", "arm", "seed", "status", "events")}
        yield RunExport(
            run_id=run.run_id, arm=run.arm, seed=run.seed, status=str(run.status),
            params=flatten(run.config), by_step=dict(sorted(by_step.items())),
            events=run.events, summary=run.summary | summary,
        )


def require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"exporting needs the '{module}' package: pip install 'lmlab[tracking]'",
                        field="--to") from None


def export(out_dir: Path, target: str, dest: Path | None = None) -> Path | str:
    """Copy the experiment in ``out_dir`` to ``target``; returns where it went."""
    if target not in TARGETS:
        raise UserError(f"unknown export target '{target}' (choose {', '.join(TARGETS)})", field="--to")
    module = importlib.import_module(f"lmlab.export.{target}_export")
    with Store.existing(out_dir) as store:
        name = experiment_name(store, out_dir)
        runs = list(iter_runs(store))
    return module.write(name, runs, dest or out_dir / f"{target}")
