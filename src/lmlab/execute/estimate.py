"""Expected wall-clock per run (template section 5, "Expected wall-clock"), measured, not guessed.

For each distinct shape among the planned runs, a short real run of the training loop (same
model, optimizer, precision, batch and sequence length; a throwaway store) gives the step time
and the set-up time; validation passes (capped and full) and a diagnostics probe are timed on
their own. A run's estimate is

    set-up + steps x step + periodic evals x eval + final eval + probes x probe + test

The step time and the set-up (everything a worker process does besides steps and evaluations)
come from that short run, made in a worker process exactly as ``lmlab run`` makes runs.

where the counts follow the run's budget and cadences. ``benchmarks/plan_estimate.py`` checks the
estimate against real runs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.batches import iter_eval_batches
from lmlab.data.tokenize import DataBundle
from lmlab.errors import UserError
from lmlab.identity import digest
from lmlab.names import STEP_TIME, Event
from lmlab.spec.expand import Plan, PlannedRun
from lmlab.spec.footprint import check_fits, host_memory_bytes
from lmlab.store import Store
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.evaluate import evaluate
from lmlab.train.step import build_run_model, resolve_device

PROBE_STEPS = 12  # timed steps per shape; the first few are warm-up and are dropped
WARMUP_STEPS = 4


@dataclass(frozen=True)
class ShapeTiming:
    setup_s: float  # a worker's fixed cost: interpreter, imports, data, model, store, checkpoint
    step_s: float  # one optimizer step (median, after warm-up)
    eval_s: float  # one periodic validation pass (capped by eval.max_batches when set)
    final_eval_s: float  # one full validation pass (the final one, always full)
    probe_s: float  # one diagnostics probe


def time_shape(cfg: RunConfig, data: DataBundle, base: Path | None = None) -> ShapeTiming:
    # A short real run without diagnostics: its time is set-up, steps, the step-0 evaluation and
    # the final (full) one, each of which is also timed on its own below.
    tree = cfg.model_dump(mode="json")
    tree["budget"] = {"steps": PROBE_STEPS}
    tree["evaluation"].update(every_steps=10**9, every_tokens=None, every_seconds=None,
                              test_at_end=False)
    tree["evaluation"]["diagnostics"].update(
        layer_grad_norms=False, norm_grad_norms=False, activation_norms=False,
        attention_entropy=False, update_ratio=False)
    tree["cadence"] = {"log_every_steps": 1, "checkpoint_every_steps": 10**9}
    probe_cfg = RunConfig.model_validate(tree)
    with tempfile.TemporaryDirectory() as tmp:
        with Store.open(Path(tmp)) as store:
            store.add_run("estimate", "estimate", 0, probe_cfg.to_json(), probe_cfg.config_hash)
        # In a worker process, as `lmlab run` does: the time around the steps and evaluations
        # (interpreter, imports, data loading, provenance, store, checkpoint) is part of a run.
        cmd = [sys.executable, "-m", "lmlab.execute.worker", tmp, "estimate",
               "--driver-pid", str(os.getpid())]
        if base is not None:
            cmd += ["--base", str(base)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        total = time.perf_counter() - t0
        with Store.open(Path(tmp)) as store:
            rows = store.metrics("estimate", [STEP_TIME]).get(STEP_TIME, [])
            if done.returncode != 0 or not rows:
                raise UserError(f"timing {PROBE_STEPS} steps of this shape failed: "
                                f"{_why(done, store)}")
    times = [r.value for r in rows[WARMUP_STEPS:]] or [r.value for r in rows]
    step_s = statistics.median(times)

    device = resolve_device(cfg.train.device)
    try:
        return _time_evaluations(cfg, data, device, total, step_s)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "allocate" not in str(e):
            raise  # not a memory error: a bug
        raise UserError(f"timing an evaluation of this shape ran out of memory: {e}",
                        field="evaluation.batch_size") from None


def _time_evaluations(cfg: RunConfig, data: DataBundle, device: torch.device, total: float,
                      step_s: float) -> ShapeTiming:
    model = build_run_model(cfg, data.tokenizer.vocab_size).to(device)

    def timed_eval(max_batches: int | None) -> float:
        t0 = time.perf_counter()
        evaluate(model, data.splits["valid"], data.stats["valid"], cfg.train.seq_len,
                 cfg.evaluation.batch_size, max_batches, device, cfg.train.precision)
        return time.perf_counter() - t0

    final_eval_s = timed_eval(None)
    eval_s = timed_eval(cfg.evaluation.max_batches) if cfg.evaluation.max_batches else final_eval_s
    probe_x = next(iter_eval_batches(data.splits["valid"], cfg.train.seq_len, 4, 1))[0].to(device)
    t0 = time.perf_counter()
    Diagnostics(cfg.evaluation.diagnostics, model, probe_x).probe()
    probe_s = time.perf_counter() - t0
    setup_s = max(0.0, total - step_s * PROBE_STEPS - eval_s - final_eval_s)
    model.to("cpu")  # give the accelerator back before the next shape is timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ShapeTiming(setup_s=setup_s, step_s=step_s, eval_s=eval_s,
                       final_eval_s=final_eval_s, probe_s=probe_s)


def _why(done: subprocess.CompletedProcess, store: Store) -> str:
    """The timing worker's own account of why it produced no step times: its error message or
    the last line of its traceback, else how the run stopped (out of memory, say)."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    if done.returncode != 0:
        return lines[-1] if lines else f"its worker exited with status {done.returncode}"
    row = store.run("estimate") or {}
    events = [e for e in store.events("estimate") if e["kind"] != Event.RESUME]
    detail = f" ({events[-1]['kind']}: {events[-1]['detail'].get('error', events[-1]['detail'])})" \
        if events else ""
    return f"the run ended {row.get('status')} before its first log interval{detail}"


def _n_periodic_evals(run: PlannedRun, steps: int) -> int:
    """Evaluations before the final one: the step-0 pass and those the cadence triggers."""
    e, b = run.config.evaluation, run.config.budget
    if e.every_steps:
        n = (steps - 1) // e.every_steps
    elif e.every_tokens and b.tokens:
        n = (b.tokens - 1) // e.every_tokens
    elif e.every_seconds and b.wall_clock_s:
        n = int(b.wall_clock_s // e.every_seconds)
    else:
        n = 9  # the default: ten evaluations through the run, the last being the final one
    return n + 1


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
    diag = cfg.evaluation.diagnostics
    probes = -(-n_steps // diag.every_steps) if diag.any_probe else 0
    test_s = t.final_eval_s * test_split_ratio if cfg.evaluation.test_at_end else 0.0
    return (t.setup_s + train_s + _n_periodic_evals(run, n_steps) * t.eval_s
            + t.final_eval_s + probes * t.probe_s + test_s)


def device_memory(device_name: str) -> tuple[int, str]:
    """(bytes, what they are) of the memory one run gets where it trains: a GPU (the smallest
    of this machine's; each run has one), else this machine's memory."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        smallest = min(gpus, key=lambda g: g.total_memory)
        return smallest.total_memory, f"one {smallest.name}"
    return host_memory_bytes(), "this machine"


def check_memory(cfg: RunConfig, vocab_size: int | None = None) -> None:
    """Refuse, before anything is allocated, a config whose estimated footprint
    (:mod:`lmlab.spec.footprint`) cannot fit the device it would train on or its budget."""
    capacity, where = device_memory(cfg.train.device)
    too_big = check_fits(cfg, capacity=capacity, where=where, vocab_size=vocab_size)
    if too_big is not None:
        raise UserError(too_big.message, field=too_big.field)


def check_plan_memory(plan: Plan, data: DataBundle) -> None:
    for arm in plan.arms:
        try:
            check_memory(plan.arm_config(arm), data.tokenizer.vocab_size)
        except UserError as e:
            e.message = f"arm {arm}: {e.message}"
            raise


def estimate_plan(plan: Plan, data: DataBundle) -> dict[str, float]:
    """{run_id: expected seconds}, timing each distinct shape once (after checking that each
    fits its device: a timing run must not be what finds out)."""
    check_plan_memory(plan, data)
    timings: dict[str, ShapeTiming] = {}
    ratio = len(data.splits["test"]) / max(len(data.splits["valid"]), 1)
    out: dict[str, float] = {}
    for run in plan.runs:
        key = digest(run.config, "cost")
        if key not in timings:
            try:
                timings[key] = time_shape(run.config, data, plan.base)
            except UserError as e:
                e.message = f"arm {run.arm}: {e.message}"
                raise
        out[run.run_id] = estimate_run(run, timings[key], ratio)
    return out
