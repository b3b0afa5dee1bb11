"""Weights & Biases: one W&B run per lmlab run, grouped by experiment.

Offline by default (``WANDB_MODE`` decides otherwise): the files land under ``dest`` and
``wandb sync`` uploads them when the machine is online.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.export import RunExport, require


def write(name: str, runs: list[RunExport], dest: Path) -> Path:
    wandb = require("wandb")
    dest.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE", "offline")
    for run in runs:
        wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmlab"), group=name,
                        name=run.run_id, config={**run.params, "arm": run.arm, "seed": run.seed},
                        dir=str(dest), mode=mode, reinit="create_new")
        wb.define_metric("*", step_metric="trainer/step")
        for step, values in run.by_step.items():
            wb.log({"trainer/step": step, **values})
        if run.events:
            table = wandb.Table(columns=["step", "tokens", "kind", "detail"],
                                data=[[e["step"], e["tokens"], e["kind"], str(e["detail"])]
                                      for e in run.events])
            wb.log({"events": table})
        wb.summary.update({**run.summary, "status": run.status})
        wb.finish()
    return dest
