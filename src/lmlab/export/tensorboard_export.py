"""TensorBoard: one event-file directory per run, scalars at their optimizer step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmlab.export import RunExport, require


def write(name: str, runs: list[RunExport], dest: Path) -> Path:
    require("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    for run in runs:
        with SummaryWriter(log_dir=str(dest / name / run.run_id)) as writer:
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in run.params.items()))
            for step, values in run.by_step.items():
                for metric, value in values.items():
                    writer.add_scalar(metric, value, global_step=step)
            for e in run.events:
                writer.add_text(f"events/{e['kind']}", json.dumps(e["detail"]), global_step=e["step"])
            # hparams: scalar settings only, and the final numbers the summary holds
            hparams = {k: v for k, v in run.params.items() if isinstance(v, int | float | str | bool)}
            hparams.update(arm=run.arm, seed=run.seed, status=run.status)
            finals = {f"hparam/{k}": v for k, v in run.summary.items()
                      if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
            writer.add_hparams(hparams, finals, run_name=".")
    return dest / name
