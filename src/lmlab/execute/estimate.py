"""Expected wall-clock per run (template section 5, "Expected wall-clock"), measured, not guessed.

For each distinct shape among the planned runs, a short real run of the training loop (same
model, optimizer, precision, batch and sequence length; a throwaway store) gives the step time,
and one full validation pass gives the evaluation time. A run's estimate is

    start-up + steps x step time + evaluations x eval time + probes x probe time + test eval

where the counts follow the run's budget and cadences. ``benchmarks/plan_estimate.py`` checks the
estimate against real runs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.tokenize import DataBundle
from lmlab.spec.expand import Plan, PlannedRun
from lmlab.store import Store
from lmlab.train.loop import evaluate, resolve_device, train

PROBE_STEPS = 12  # timed steps per shape; the first few are warm-up and are dropped
WARMUP_STEPS = 4


@dataclass(frozen=True)
class ShapeTiming:
    step_s: float
    eval_s: float
    probe_s: float
    startup_s: float


def _shape_key(cfg: RunConfig) -> str:
    """Everything that changes the cost of a step (not the lr, not the seed)."""
    tree = cfg.model_dump(mode="json")
    tree["optimizer"].pop("lr", None)
    tree["schedule"] = None
    tree["train"]["seed"] = 0
    tree["budget"] = tree["eval"]["every_tokens"] = tree["eval"]["every_steps"] = None
    tree["eval"]["every_seconds"] = None
    return repr(sorted(tree.items()))


def _startup_seconds() -> float:
    """A worker process's fixed cost: interpreter, imports (torch), before data is loaded."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import lmlab.train.loop"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def time_shape(cfg: RunConfig, data: DataBundle, startup_s: float) -> ShapeTiming:
    tree = cfg.model_dump(mode="json")
    tree["budget"] = {"steps": PROBE_STEPS}
    tree["eval"].update(every_steps=10**9, every_tokens=None, every_seconds=None,
                        log_every_steps=1, checkpoint_every_steps=10**9, test_at_end=False)
    tree["diagnostics"]["every_steps"] = PROBE_STEPS - 2  # one probe, timed below
    probe_cfg = RunConfig.model_validate(tree)
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp)) as store:
        store.add_run("estimate", "estimate", 0, probe_cfg.to_json(), probe_cfg.config_hash)
        t0 = time.perf_counter()
        train(probe_cfg, "estimate", store, Path(tmp) / "run", data=data)
        total = time.perf_counter() - t0
        rows = store.metrics("estimate", ["step_time_s"]).get("step_time_s", [])
    times = [r.value for r in rows[WARMUP_STEPS:]] or [r.value for r in rows]
    step_s = statistics.median(times)
    # The rest of that short run is set-up, two validation passes (start, end) and one probe.
    device = resolve_device(cfg.train.device)
    from lmlab.model import build_model

    model = build_model(cfg.model, data.tokenizer.vocab_size, cfg.train.seq_len).to(device)
    t0 = time.perf_counter()
    evaluate(model, data.splits["valid"], data.stats["valid"], cfg.train.seq_len,
             cfg.eval.batch_size, cfg.eval.max_batches, device, cfg.train.precision)
    eval_s = time.perf_counter() - t0
    probe_s = max(0.0, (total - step_s * PROBE_STEPS - 2 * eval_s) * 0.2)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ShapeTiming(step_s=step_s, eval_s=eval_s, probe_s=probe_s, startup_s=startup_s)


def _n_evals(run: PlannedRun, steps: int) -> int:
    e, b = run.config.eval, run.config.budget
    if e.every_steps:
        n = steps // e.every_steps
    elif e.every_tokens and b.tokens:
        n = b.tokens // e.every_tokens
    elif e.every_seconds and b.wall_clock_s:
        n = int(b.wall_clock_s // e.every_seconds)
    else:
        n = 10
    return n + 2  # the step-0 evaluation and the final one


def estimate_run(run: PlannedRun, t: ShapeTiming, test_split_ratio: float) -> float:
    cfg = run.config
    if cfg.budget.steps:
        steps = cfg.budget.steps
    elif cfg.budget.tokens:
        steps = -(-cfg.budget.tokens // cfg.train.tokens_per_step)
    else:
        steps = None
    train_s = steps * t.step_s if steps is not None else cfg.budget.wall_clock_s or 0.0
    n_steps = steps if steps is not None else int(train_s / t.step_s)
    probes = n_steps // cfg.diagnostics.every_steps if cfg.diagnostics.any_probe else 0
    test_s = t.eval_s * test_split_ratio if cfg.eval.test_at_end else 0.0
    return t.startup_s + train_s + _n_evals(run, n_steps) * t.eval_s + probes * t.probe_s + test_s


def estimate_plan(plan: Plan, data: DataBundle) -> dict[str, float]:
    """{run_id: expected seconds}, timing each distinct shape once."""
    startup = _startup_seconds()
    timings: dict[str, ShapeTiming] = {}
    ratio = len(data.splits["test"]) / max(len(data.splits["valid"]), 1)
    out: dict[str, float] = {}
    for run in plan.runs:
        key = _shape_key(run.config)
        if key not in timings:
            timings[key] = time_shape(run.config, data, startup)
        out[run.run_id] = estimate_run(run, timings[key], ratio)
    return out
