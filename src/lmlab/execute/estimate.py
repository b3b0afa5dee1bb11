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

A pack (``lmlab.execute.pack``) is timed the same way, as a short packed run of as many members
in the pack's worker process: its step time is the pack's, its set-up one process's, and each
member adds its own evaluations and probes. A packed run's estimate is its share of its pack's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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


def time_shape(cfg: RunConfig, data: DataBundle, base: Path | None = None,
               members: int = 1) -> ShapeTiming:
    """The timings of ``cfg``'s shape, trained solo or, with ``members`` > 1, as a pack of that
    many (then ``step_s`` is the pack's step and ``setup_s`` the pack's process)."""
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
    ids = [f"estimate-{i}" for i in range(members)]
    with tempfile.TemporaryDirectory() as tmp:
        with Store.open(Path(tmp)) as store:
            for i, rid in enumerate(ids):
                tree["train"]["seed"] = i
                probe_cfg = RunConfig.model_validate(tree)
                store.add_run(rid, "estimate", i, probe_cfg.to_json(), probe_cfg.config_hash)
        # In a worker process, as `lmlab run` does: the time around the steps and evaluations
        # (interpreter, imports, data loading, provenance, store, checkpoint) is part of a run.
        cmd = [sys.executable, "-m", "lmlab.execute.worker", tmp, *ids,
               "--driver-pid", str(os.getpid())]
        if base is not None:
            cmd += ["--base", str(base)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        total = time.perf_counter() - t0
        with Store.open(Path(tmp)) as store:
            rows = store.metrics(ids[0], [STEP_TIME]).get(STEP_TIME, [])
            if done.returncode != 0 or not rows:
                raise UserError(f"timing {PROBE_STEPS} steps of this shape failed: "
                                f"{_why(done, store, ids[0])}")
    times = [r.value for r in rows[WARMUP_STEPS:]] or [r.value for r in rows]
    step_s = statistics.median(times)

    device = resolve_device(cfg.train.device)
    try:
        return _time_evaluations(cfg, data, device, total, step_s, members)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "allocate" not in str(e):
            raise  # not a memory error: a bug
        raise UserError(f"timing an evaluation of this shape ran out of memory: {e}",
                        field="evaluation.batch_size") from None


def _time_evaluations(cfg: RunConfig, data: DataBundle, device: torch.device, total: float,
                      step_s: float, members: int) -> ShapeTiming:
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
    setup_s = max(0.0, total - step_s * PROBE_STEPS - members * (eval_s + final_eval_s))
    model.to("cpu")  # give the accelerator back before the next shape is timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ShapeTiming(setup_s=setup_s, step_s=step_s, eval_s=eval_s,
                       final_eval_s=final_eval_s, probe_s=probe_s)


def _why(done: subprocess.CompletedProcess, store: Store, run_id: str) -> str:
    """The timing worker's own account of why it produced no step times: its error message or
    the last line of its traceback, else how the run stopped (out of memory, say)."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    if done.returncode != 0:
        return lines[-1] if lines else f"its worker exited with status {done.returncode}"
    row = store.run(run_id) or {}
    events = [e for e in store.events(run_id) if e["kind"] != Event.RESUME]
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


def _training_s(run: PlannedRun, t: ShapeTiming) -> tuple[float, int]:
    """(training seconds, steps) of ``run`` at ``t``'s step time."""
    cfg = run.config
    if cfg.budget.steps:
        steps = cfg.budget.steps
    elif cfg.budget.tokens:
        steps = -(-cfg.budget.tokens // cfg.train.tokens_per_step)
    else:
        steps = None
    train_s = steps * t.step_s if steps is not None else cfg.budget.wall_clock_s or 0.0
    return train_s, steps if steps is not None else int(train_s / t.step_s)


def _watching_s(run: PlannedRun, t: ShapeTiming, steps: int, test_split_ratio: float) -> float:
    """What ``run`` spends besides its steps and its process: evaluations and probes."""
    cfg = run.config
    diag = cfg.evaluation.diagnostics
    probes = -(-steps // diag.every_steps) if diag.any_probe else 0
    test_s = t.final_eval_s * test_split_ratio if cfg.evaluation.test_at_end else 0.0
    return (_n_periodic_evals(run, steps) * t.eval_s + t.final_eval_s + probes * t.probe_s
            + test_s)


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


def estimate_run(run: PlannedRun, t: ShapeTiming, test_split_ratio: float) -> float:
    train_s, steps = _training_s(run, t)
    return t.setup_s + train_s + _watching_s(run, t, steps, test_split_ratio)


def estimate_pack(runs: Sequence[PlannedRun], t: ShapeTiming, test_split_ratio: float) -> float:
    """A pack's wall-clock: one process, the steps of its longest member at the pack's step
    time, and every member's own evaluations and probes."""
    trained = [_training_s(r, t) for r in runs]
    return (t.setup_s + max(s for s, _ in trained)
            + sum(_watching_s(r, t, n, test_split_ratio)
                  for r, (_, n) in zip(runs, trained, strict=True)))


def estimate_plan(plan: Plan, data: DataBundle,
                  packs: Sequence[Sequence[PlannedRun]] | None = None) -> dict[str, float]:
    """{run_id: expected seconds}, timing each distinct shape (and pack size) once, after
    checking that each fits its device (a timing run must not be what finds out). With
    ``packs`` (the units the runs train in), a packed run's figure is its share of its pack's
    wall-clock, so the figures still add up to the experiment's."""
    check_plan_memory(plan, data)
    timings: dict[tuple[str, int], ShapeTiming] = {}
    ratio = len(data.splits["test"]) / max(len(data.splits["valid"]), 1)
    out: dict[str, float] = {}
    for unit in packs if packs is not None else [[r] for r in plan.runs]:
        key = (digest(unit[0].config, "cost"), len(unit))
        if key not in timings:
            try:
                timings[key] = time_shape(unit[0].config, data, plan.base, members=len(unit))
            except UserError as e:
                e.message = f"arm {unit[0].arm}: {e.message}"
                raise
        if len(unit) == 1:
            out[unit[0].run_id] = estimate_run(unit[0], timings[key], ratio)
            continue
        share = estimate_pack(unit, timings[key], ratio) / len(unit)
        out.update({r.run_id: share for r in unit})
    return out
