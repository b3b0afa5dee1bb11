"""The Memory / Systems Experiment Addendum, computed from an experiment's run records.

For SDPA vs manual attention, activation checkpointing, gradient accumulation, precision,
torch.compile and the optimizer implementation, the template asks for a table (Config | Step
Time | Tokens/sec | Peak VRAM | Final Val Loss) measured under fixed conditions (fixed tokens per
run, the same seed, the same effective batch) and three conclusions: memory saved, speed change,
and any training-behaviour difference. :func:`systems_addendum` computes the numbers behind all
of it; :mod:`lmlab.report.sections.addendum` words them.

How each number is measured: with the run quantities of :mod:`lmlab.analysis.records` (step time
and tokens/sec over the whole run's training time, peak memory over the run, final validation
loss of completed runs), averaged over an arm's seeds. The spread of tokens/sec is the standard
deviation over seeds when an arm has two or more; with one seed, the spread over that run's log
intervals (repeats within the run). ``steady_tokens_per_s`` (after the first log interval) is kept
beside it for the one-off costs of the first steps (torch.compile, allocator warm-up).

Training behaviour is compared step by step: each arm's per-step train loss against the reference
arm's run with the same seed, at the same steps. The largest and mean absolute difference are
judged against the tolerance the change is expected to stay within (``KNOB_TOLERANCE``, below):
"equivalent", or "differs" with the first step where the curves part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from lmlab.analysis.records import MEASURED_THROUGH, RunRecord, mixed_hardware
from lmlab.analysis.summary import Experiment
from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.names import EFFECTIVE_BATCH_PATHS, PER_SEED_PATHS, TOKENS_PER_S, TRAIN_LOSS, Event

# ---- expected numerical tolerances -----------------------------------------------------------
#
# The largest absolute difference of the per-step train loss (nats) between an arm and the
# reference arm, same seed, same steps, that a change which leaves the maths alone is expected
# to stay within, on CPU and on CUDA. Tests show the CPU values hold on real runs of the loop
# (tests/test_systems.py: 20-step runs of a small GPT on real text). Over long runs any
# reordering of float operations eventually moves the trajectory further; the tolerances are
# for runs of tens to a few hundred steps.


@dataclass(frozen=True)
class Tolerance:
    cpu: float
    cuda: float
    why: str


KNOB_TOLERANCE: dict[str, Tolerance] = {
    # Recomputing a block in backward replays the same kernels on the same inputs.
    "train.activation_checkpointing": Tolerance(
        1e-5, 1e-3, "recomputation replays the same operations: bit-identical on CPU (CUDA "
        "kernels with atomics are not bit-deterministic run to run)"),
    # 4 x (B/4) and 1 x B sum the same per-sequence gradients in a different order.
    "train.grad_accum": Tolerance(
        1e-4, 1e-3, "the same gradient summed in a different order (fp32)"),
    # The fused kernels and the written-out softmax compute the same attention.
    "model.attention": Tolerance(
        1e-3, 1e-3, "the same attention, fused kernel vs materialised softmax"),
    # On CPU the pin is not applied (PyTorch has one CPU kernel family): nothing changes.
    "model.sdpa_backend": Tolerance(
        1e-5, 1e-3, "the same attention from another kernel (on CPU the pin has no effect)"),
    # foreach / fused / plain AdamW are the same update, batched differently.
    "optimizer.impl": Tolerance(
        1e-3, 1e-3, "the same optimizer update, batched over tensors differently"),
    # Kernel fusion reorders float operations.
    "train.compile": Tolerance(1e-3, 5e-3, "fused kernels reorder float operations"),
    # TF32 matmuls keep 10 mantissa bits; the flag only exists on CUDA.
    "train.tf32": Tolerance(1e-5, 2e-2, "TF32 matmuls round inputs to 10 mantissa bits (CUDA "
                            "only: no effect on CPU)"),
    # bf16 keeps 8 bits of mantissa, fp16 11 (with loss scaling, which may skip early steps).
    "train.precision": Tolerance(5e-2, 5e-2, "reduced-precision autocast (bf16: 8 mantissa "
                                 "bits; fp16: loss scaling may skip early steps)"),
}
# Whatever the change, comparisons between runs that compute in reduced precision (either run
# bf16/fp16), or in TF32 on CUDA, cannot be tighter than that precision allows.
PRECISION_FLOOR = {"bf16": 5e-2, "fp16": 5e-2}
TF32_FLOOR_CUDA = 1e-2


def expected_tolerance(changed: Mapping[str, tuple[Any, Any]], device: str,
                       precisions: Sequence[str] = ("fp32",),
                       tf32: bool = False) -> tuple[float | None, str]:
    """(tolerance, why) for an arm that differs from the reference in ``changed``
    ({path: (reference value, arm value)}). None when a change is not numerics-only (it changes
    the model, the data or the optimisation itself: the curves are expected to differ)."""
    if not changed:
        return (1e-5 if device == "cpu" else 1e-3), "no difference in configuration"
    unknown = [p for p in changed if p not in KNOB_TOLERANCE]
    if unknown:
        return None, (f"{', '.join(unknown)} changes what is trained, not only how it is "
                      "computed: no numerical tolerance applies")
    gpu = device != "cpu"
    tol, whys = 0.0, []
    for path in changed:
        t = KNOB_TOLERANCE[path]
        value = t.cuda if gpu else t.cpu
        tol = max(tol, value)
        whys.append(f"{path}: {value:g} ({t.why})")
    reduced = [p for p in precisions if p in PRECISION_FLOOR]
    if reduced and tol < max(PRECISION_FLOOR[p] for p in reduced):
        tol = max(PRECISION_FLOOR[p] for p in reduced)
        whys.append(f"at least {tol:g} because the runs compute in {'/'.join(sorted(set(reduced)))}")
    if gpu and tf32 and "fp32" in precisions and tol < TF32_FLOOR_CUDA:
        tol = TF32_FLOOR_CUDA
        whys.append(f"at least {tol:g} because fp32 matmuls run in TF32 on CUDA")
    return tol, "; ".join(whys)




# ---- the addendum's parts ----------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSystems:
    """One row of the Compare table: an arm's numbers, averaged over its measured seeds."""

    arm: str
    n: int  # seeds measured (completed or diverged)
    step_time_s: float | None
    tokens_per_s: float | None
    tokens_per_s_std: float | None
    spread_over: str | None  # "2 seeds" | "11 log intervals of one run"
    steady_tokens_per_s: float | None
    peak_mem_bytes: float | None
    peak_mem_std: float | None
    peak_mem_kind: str | None
    final_val_loss: float | None
    final_val_loss_std: float | None
    n_final: int
    seeds: list[int]
    statuses: dict[str, str]


@dataclass(frozen=True)
class Behaviour:
    """An arm's per-step train loss against the reference's, seed by seed."""

    verdict: Literal["equivalent", "differs", "no_tolerance", "not_comparable"]
    tolerance: float | None
    why: str
    pairs: int
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    device: str = "cpu"
    steps: int = 0
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    bit_identical: bool = False
    first_step_over_tolerance: int | None = None
    status_mismatch: list[tuple[int, str, str]] = field(default_factory=list)  # seed, ref, arm
    per_seed: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    arm: str
    memory_saved_bytes: float | None
    memory_saved_pct: float | None
    speed_change_pct: float | None
    speed_change_spread_pct: float | None
    step_time_change_pct: float | None
    final_val_loss_diff: float | None
    behaviour: Behaviour


@dataclass(frozen=True)
class Condition:
    ok: bool
    detail: dict[str, Any]


@dataclass(frozen=True)
class Addendum:
    reference: str
    rows: list[ArmSystems]
    comparisons: dict[str, Comparison]  # every arm but the reference
    conditions: dict[str, Condition]  # fixed_tokens, same_seed, same_effective_batch, same_hardware
    memory_kind: str | None  # "rss" | "cuda_allocated" | None (mixed or unknown)
    compile_fallbacks: list[str]  # run ids that fell back to eager
    sdpa_pin_on_cpu: bool  # an arm varied model.sdpa_backend on CPU, where it has no effect

    @property
    def conditions_met(self) -> bool:
        return all(c.ok for c in self.conditions.values())


# ---- computing it ------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _device(run: RunRecord) -> str:
    return str(run.provenance.get("device", "cpu")).split(":")[0]


def _arm_row(arm: str, runs: list[RunRecord]) -> ArmSystems:
    used = [r for r in runs if r.status in MEASURED_THROUGH]
    tps = _present([r.metrics["tokens_per_s"] for r in used])
    if len(tps) >= 2:
        spread, spread_over = _std(tps), f"{len(tps)} seeds"
    elif len(used) == 1 and len(intervals := _present(used[0].values(TOKENS_PER_S))) >= 2:
        spread, spread_over = _std(intervals), f"{len(intervals)} log intervals of one run"
    else:
        spread, spread_over = None, None
    peaks = _present([r.metrics["peak_mem_bytes"] for r in used])
    finals = _present([r.metrics["final_val_loss"] for r in used])
    kinds = {r.summary.get("peak_mem_kind") for r in used if r.summary.get("peak_mem_kind")}
    return ArmSystems(
        arm=arm, n=len(used), step_time_s=_mean(_present([r.metrics["step_time_s"] for r in used])),
        tokens_per_s=_mean(tps), tokens_per_s_std=spread, spread_over=spread_over,
        steady_tokens_per_s=_mean(_present([r.steady_tokens_per_s for r in used])),
        peak_mem_bytes=_mean(peaks), peak_mem_std=_std(peaks),
        peak_mem_kind=kinds.pop() if len(kinds) == 1 else None,
        final_val_loss=_mean(finals), final_val_loss_std=_std(finals), n_final=len(finals),
        seeds=sorted(r.seed for r in used), statuses={r.run_id: r.status for r in runs})


def changed_paths(ref: RunRecord, run: RunRecord) -> dict[str, tuple[Any, Any]]:
    """{path: (reference value, arm value)} for every config path the two runs differ in."""
    a, b = flatten(ref.config), flatten(run.config)
    return {p: (a.get(p), b.get(p)) for p in sorted(set(a) | set(b))
            if p not in PER_SEED_PATHS and repr(a.get(p)) != repr(b.get(p))}


def compare_curves(ref: Mapping[int, float], other: Mapping[int, float],
                   tolerance: float | None) -> dict[str, Any]:
    """Step-by-step |Δ train loss| over the steps both runs logged."""
    steps = sorted(set(ref) & set(other))
    diffs = [abs(other[s] - ref[s]) for s in steps]
    finite = [d for d in diffs if math.isfinite(d)]
    over = [s for s, d in zip(steps, diffs, strict=True)
            if not math.isfinite(d) or (tolerance is not None and d > tolerance)]
    return {
        "steps": len(steps),
        "max_abs_diff": max(finite) if finite else None,
        "mean_abs_diff": float(np.mean(finite)) if finite else None,
        "non_finite_steps": len(diffs) - len(finite),
        "first_step_over_tolerance": over[0] if over else None,
        "missing_steps": len(set(ref) ^ set(other)),
    }


def _losses(run: RunRecord) -> dict[int, float]:
    return {r.step: r.value for r in run.curves.get(TRAIN_LOSS, [])}


def behaviour(ref_runs: list[RunRecord], runs: list[RunRecord]) -> Behaviour:
    """The arm's curves against the reference's, seed by seed, judged against the tolerance."""
    by_seed = {r.seed: r for r in ref_runs}
    pairs = [(by_seed[r.seed], r) for r in runs if r.seed in by_seed and _losses(r)
             and _losses(by_seed[r.seed])]
    if not pairs:
        return Behaviour("not_comparable", None, "no run shares a seed with a reference run "
                         "that logged a train-loss curve", 0)
    ref0, run0 = pairs[0]
    changed = changed_paths(ref0, run0)
    device = _device(run0) if _device(run0) == _device(ref0) else "cuda"
    f_ref, f_run = flatten(ref0.config), flatten(run0.config)
    precisions = [f_ref.get("train.precision", "fp32"), f_run.get("train.precision", "fp32")]
    tf32 = bool(f_ref.get("train.tf32")) or bool(f_run.get("train.tf32"))
    tol, why = expected_tolerance(changed, device, precisions, tf32)
    per_seed = {run.seed: compare_curves(_losses(ref), _losses(run), tol) for ref, run in pairs}
    comps = list(per_seed.values())
    maxes = [c["max_abs_diff"] for c in comps if c["max_abs_diff"] is not None]
    means = [c["mean_abs_diff"] for c in comps if c["mean_abs_diff"] is not None]
    firsts = [c["first_step_over_tolerance"] for c in comps
              if c["first_step_over_tolerance"] is not None]
    mismatch = [(run.seed, ref.status, run.status) for ref, run in pairs if run.status != ref.status]
    missing = sum(c["missing_steps"] for c in comps)
    verdict: Any = ("no_tolerance" if tol is None else
                    "differs" if firsts or mismatch or missing else "equivalent")
    return Behaviour(
        verdict=verdict, tolerance=tol, why=why, pairs=len(pairs), changed=changed,
        device=device, steps=max(c["steps"] for c in comps),
        max_abs_diff=max(maxes) if maxes else None, mean_abs_diff=_mean(means),
        bit_identical=bool(maxes) and max(maxes) == 0.0 and not firsts,
        first_step_over_tolerance=min(firsts) if firsts else None, status_mismatch=mismatch,
        per_seed=per_seed)


def _conditions(runs: list[RunRecord]) -> dict[str, Condition]:
    """The template's measurement conditions, checked on what the runs were configured with and
    what the completed ones saw."""
    planned = [flatten(r.config).get("budget.tokens") for r in runs]
    budgets = sorted({t for t in planned if t is not None})
    reached = sorted({r.tokens for r in runs if r.completed})
    targets = budgets or reached
    tokens_ok = (len(targets) == 1 and all(t == targets[0] for t in reached)
                 and (not budgets or None not in planned))

    seeds_by_arm: dict[str, list[int]] = {}
    for r in runs:
        seeds_by_arm.setdefault(r.arm, []).append(r.seed)
    seed_sets = {tuple(sorted(s)) for s in seeds_by_arm.values()}

    batches = {tuple(flatten(r.config).get(k) for k in EFFECTIVE_BATCH_PATHS) for r in runs}
    micro = {}
    for r in runs:
        f = flatten(r.config)
        bs, acc = f.get("train.batch_size"), f.get("train.grad_accum", 1)
        micro.setdefault(r.arm, (bs // acc, acc) if bs and acc else None)
    return {
        "fixed_tokens": Condition(tokens_ok, {"planned": budgets, "reached": reached}),
        "same_seed": Condition(len(seed_sets) == 1, {"seeds": seeds_by_arm}),
        "same_effective_batch": Condition(len(batches) == 1, {
            "batch_size": {r.arm: flatten(r.config).get("train.batch_size") for r in runs},
            "micro_batches": micro}),
        # Speed and memory are the hardware's as much as the arm's: across different hardware
        # they are not compared at all (the loss comparisons still stand).
        "same_hardware": Condition(not (mixed := mixed_hardware(runs)), {"hardware": mixed}),
    }


def _pct(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return 100.0 * (a / b - 1.0)


def _comparison(row: ArmSystems, ref: ArmSystems, beh: Behaviour) -> Comparison:
    saved = (ref.peak_mem_bytes - row.peak_mem_bytes
             if row.peak_mem_bytes is not None and ref.peak_mem_bytes is not None else None)
    spread = None
    a, b, sa, sb = row.tokens_per_s, ref.tokens_per_s, row.tokens_per_s_std, ref.tokens_per_s_std
    if a and b and sa is not None and sb is not None:  # propagated from both arms' spreads
        spread = 100.0 * (a / b) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)
    return Comparison(
        arm=row.arm, memory_saved_bytes=saved,
        memory_saved_pct=(100.0 * saved / ref.peak_mem_bytes
                          if saved is not None and ref.peak_mem_bytes else None),
        speed_change_pct=_pct(row.tokens_per_s, ref.tokens_per_s),
        speed_change_spread_pct=spread,
        step_time_change_pct=_pct(row.step_time_s, ref.step_time_s),
        final_val_loss_diff=(row.final_val_loss - ref.final_val_loss
                             if row.final_val_loss is not None and ref.final_val_loss is not None
                             else None),
        behaviour=beh)


def systems_addendum(exp: Experiment) -> Addendum:
    """The addendum of ``exp``; the reference arm is the plan's, else the first arm."""
    if not exp.runs:
        raise UserError("no runs in this experiment yet: nothing to compare",
                        file=str(exp.directory))
    arms = [a for a in exp.arms if exp.runs_of(a)]
    reference = exp.reference if exp.reference in arms else None
    if reference is None:
        raise UserError(f"reference arm '{exp.reference}' has no runs (arms: {', '.join(arms)})",
                        file=str(exp.directory))
    rows = [_arm_row(a, exp.runs_of(a)) for a in arms]
    ref_row = next(r for r in rows if r.arm == reference)
    comparisons = {row.arm: _comparison(row, ref_row, behaviour(exp.runs_of(reference),
                                                                exp.runs_of(row.arm)))
                   for row in rows if row.arm != reference}
    if mixed_hardware(exp.runs):
        comparisons = {arm: replace(c, memory_saved_bytes=None, memory_saved_pct=None,
                                    speed_change_pct=None, speed_change_spread_pct=None,
                                    step_time_change_pct=None)
                       for arm, c in comparisons.items()}
    kinds = {r.peak_mem_kind for r in rows if r.peak_mem_kind}
    return Addendum(
        reference=reference, rows=rows, comparisons=comparisons,
        conditions=_conditions(exp.runs), memory_kind=kinds.pop() if len(kinds) == 1 else None,
        compile_fallbacks=[r.run_id for r in exp.runs
                           if any(e["kind"] == Event.COMPILE_FALLBACK for e in r.events)],
        sdpa_pin_on_cpu=any("model.sdpa_backend" in c.behaviour.changed
                            and c.behaviour.device == "cpu" for c in comparisons.values()))
