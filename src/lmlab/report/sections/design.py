"""Section 5, Experimental Design: the budget (planned and as run), the evaluation protocol the
runs followed, and the comparison axis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmlab.analysis.summary import AXIS_X
from lmlab.names import (
    DIAG_BLOCK_GRAD,
    GRAD_NORM,
    PEAK_MEM,
    TEST,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL,
    VAL_LOSS,
    eval_metric,
)
from lmlab.report.format import CHECKED, NA, UNCHECKED, Item, integer, mib, seconds
from lmlab.report.inputs import ReportInputs

AXIS_BOXES = (("equal_tokens", "Equal tokens seen"), ("equal_steps", "Equal optimizer steps"),
              ("equal_wall_clock", "Equal wall-clock time"))
AXIS_NOTES = {
    "tokens": "every arm trains on the same number of tokens; curves are drawn against tokens "
              "seen",
    "step": "every arm takes the same number of optimizer steps; curves are also drawn against "
            "steps",
    "wall_s": "every arm trains for the same training seconds (evaluation excluded); curves are "
              "also drawn against training time",
}


@dataclass(frozen=True)
class Design:
    budget: list[Item]
    protocol: list[Item]
    axis: list[Item]  # one box per axis, the experiment's checked
    axis_note: str


def section(inputs: ReportInputs) -> Design:
    exp = inputs.exp
    plan_runs = (exp.plan or {}).get("runs", [])
    done = [r for r in exp.runs if r.summary]  # ended runs: their progress is final

    def planned(key: str, fmt: Callable[[float], str]) -> str:
        values = sorted({p[key] for p in plan_runs if p.get(key) is not None})
        return " / ".join(fmt(v) for v in values) if values else "not set"

    def actual(values: list[float], fmt: Callable[[float], str]) -> str:
        if not values:
            return "no run has finished"
        lo, hi = min(values), max(values)
        return fmt(lo) if lo == hi else f"{fmt(lo)} to {fmt(hi)} (mean {fmt(np.mean(values))})"

    budget = inputs.spec.budget if inputs.spec else None
    est_run = [float(p["estimate_s"]) for p in plan_runs if p.get("estimate_s") is not None]
    est_total = (exp.plan or {}).get("estimate_total_s")
    wall = [r.wall_s for r in done]
    train = [r.train_s for r in done]
    expected = f"estimated {seconds(np.mean(est_run))} per run" if est_run else "no estimate"
    if est_total is not None:
        expected += f", {seconds(float(est_total))} in total"
    if wall:
        expected += (f"; actual {seconds(np.mean(wall))} per run on average "
                     f"({seconds(np.mean(train)) if train else NA} of it training), "
                     f"{seconds(sum(wall))} in total over {len(wall)} runs")
    if budget and budget.wall_clock_s:
        expected += f"; wall-clock budget {seconds(budget.wall_clock_s)} of training per run"
    max_mem = budget.max_memory_mb if budget else None
    peaks = [float(m) for r in exp.runs if (m := r.metrics.get("peak_mem_bytes")) is not None]
    mem = (f"{max_mem:,.0f} MiB" if max_mem else "no limit set") + (
        f"; measured {inputs.memory_label} up to {mib(max(peaks))}" if peaks else "")
    return Design(
        budget=[
            Item("Tokens per run", f"{planned('tokens', integer)} planned; "
                                   f"{actual([float(r.tokens) for r in done], integer)} seen"),
            Item("Steps per run", f"{planned('steps', integer)} planned; "
                                  f"{actual([float(r.steps) for r in done], integer)} run"),
            Item("Expected wall-clock", expected),
            Item("Max VRAM allowed", mem),
        ],
        protocol=_protocol(inputs),
        axis=[Item(CHECKED if key == exp.axis else UNCHECKED, label) for key, label in AXIS_BOXES],
        axis_note=AXIS_NOTES[AXIS_X.get(exp.axis, "tokens")])


def _protocol(inputs: ReportInputs) -> list[Item]:
    runs = inputs.exp.runs
    names = {n for r in runs for n in r.curves}
    cfg = inputs.flat
    n_runs = max(len([r for r in runs if r.curves]), 1)
    evals = sum(len(r.curves.get(VAL_LOSS, [])) for r in runs) / n_runs
    cadence = ("every " + integer(cfg["evaluation.every_tokens"]) + " tokens"
               if cfg.get("evaluation.every_tokens") else
               f"every {cfg['evaluation.every_steps']} steps" if cfg.get("evaluation.every_steps")
               else f"every {cfg['evaluation.every_seconds']:g} training seconds"
               if cfg.get("evaluation.every_seconds") else "at every tenth of the run")
    split = ("the full validation split" if not cfg.get("evaluation.max_batches") else
             f"{cfg['evaluation.max_batches']} batches of {cfg.get('evaluation.batch_size')} "
             "windows (capped, not the full split)")
    clip = cfg.get("train.grad_clip")

    def logged(name: str, text: str) -> str:
        return text if name in names else "not logged"

    test = "; test split at the end" if eval_metric(TEST, "loss") in names else ""
    memory = ("CUDA allocator peak (allocated; reserved logged too)"
              if inputs.memory_kind == "cuda_allocated" else
              "process peak resident memory (RSS): CPU runs, no VRAM")
    layer_wise = (f"every {cfg.get('evaluation.diagnostics.every_steps')} steps, per block and "
                  "per parameter kind" if any(n.startswith(DIAG_BLOCK_GRAD) for n in names)
                  else "not logged")
    return [
        Item("Train loss", logged(TRAIN_LOSS, "every optimizer step (cross-entropy, before any "
                                              "label smoothing or z-loss)")),
        Item("Validation loss", logged(VAL_LOSS, f"{cadence} on {split}, plus step 0 "
                                                 f"({evals:.0f} evaluations per run)")),
        Item("Perplexity", logged(eval_metric(VAL, "ppl"), "validation perplexity, bits per "
                                  "byte and word-level perplexity at every evaluation" + test)),
        Item("Throughput (tokens/sec)", logged(TOKENS_PER_S, "per log interval (every "
                                               f"{cfg.get('cadence.log_every_steps')} steps), "
                                               "over training time with evaluation excluded")),
        Item("Peak VRAM", logged(PEAK_MEM, memory)),
        Item("Gradient norm (global)", logged(GRAD_NORM, "every step, before clipping" + (
            f" (clipped at {clip:g})" if clip else " (no clipping)"))),
        Item("(Optional) Layer-wise grad norms", layer_wise),
    ]
