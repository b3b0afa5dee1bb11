"""The Memory / Systems Experiment Addendum, answered from the store.

For SDPA vs manual attention, activation checkpointing, gradient accumulation, precision,
torch.compile and the optimizer implementation, the template asks for a table (Config | Step
Time | Tokens/sec | Peak VRAM | Final Val Loss) measured under fixed conditions (fixed tokens per
run, the same seed, the same effective batch) and three conclusion lines: memory saved, speed
change, and any training-behaviour difference. ``systems_addendum(store)`` computes all of it from
what the runs logged and stores it as the ``systems/addendum`` result; the report renders it and
``print_systems(DIR)`` prints it.

How each number is measured
- Step time and tokens/sec are *steady state*: training seconds (evaluation and probes excluded)
  from the end of the first log interval to the end of the run, so one-off costs of the first
  steps (allocator warm-up, torch.compile, lazy kernel selection) don't count against an arm.
  With one log interval only, the whole run is used (``warmup_included``).
- The spread of tokens/sec is the standard deviation over seeds when an arm has two or more;
  with one seed it is the spread over that run's steady-state log intervals (repeats within the
  run). Which one is given in ``spread_over``.
- Peak memory is the run summary's: CUDA's peak allocated bytes on GPU, the process's peak
  resident set on CPU (each run is its own process; the peak is reset when training starts, so it
  holds the training steps and the evaluations, and on CPU also the interpreter and libraries).
- Final validation loss is the full-split evaluation at the end of a completed run.

Training behaviour is compared step by step: each arm's per-step train loss against the reference
arm's run with the same seed, at the same steps. The largest and mean absolute difference are
judged against the tolerance the change is expected to stay within (``KNOB_TOLERANCE``, below):
"equivalent within tolerance", or "differs" with the first step where the curves part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.store import FILENAME, Store

RESULT_KEY = "systems/addendum"


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


# ---- reading the runs --------------------------------------------------------------------------


@dataclass
class _Run:
    run_id: str
    arm: str
    seed: int
    status: str
    flat: dict[str, Any]
    device: str
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    interval_tokens_per_s: list[float] = field(default_factory=list)
    warmup_included: bool = False
    peak_mem_bytes: float | None = None
    peak_mem_kind: str | None = None
    final_val_loss: float | None = None
    tokens: int | None = None
    train_loss: dict[int, float] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _read_run(store: Store, row: Mapping[str, Any]) -> _Run:
    rid = row["run_id"]
    summary = row.get("summary") or {}
    prov = row.get("provenance") or {}
    config = row.get("config") or {}
    run = _Run(rid, row["arm"], int(row["seed"]), row["status"], flatten(config),
               str(prov.get("device", "cpu")).split(":")[0])
    curves = store.metrics(rid, ["train_loss", "step_time_s", "tokens_per_s", "peak_mem_bytes",
                                 "val_loss"])
    # Steady state: from the end of the first log interval to the end of the run.
    marks = curves.get("step_time_s", [])
    if len(marks) >= 2 and marks[-1].wall_s > marks[0].wall_s and marks[-1].step > marks[0].step:
        first, last = marks[0], marks[-1]
        run.step_time_s = (last.wall_s - first.wall_s) / (last.step - first.step)
        run.tokens_per_s = (last.tokens - first.tokens) / (last.wall_s - first.wall_s)
        steady = {r.step for r in marks[1:]}
        run.interval_tokens_per_s = [r.value for r in curves.get("tokens_per_s", [])
                                     if r.step in steady and math.isfinite(r.value)]
    elif summary.get("train_s") and summary.get("steps"):
        run.step_time_s = float(summary["train_s"]) / float(summary["steps"])
        run.tokens_per_s = _finite(summary.get("tokens_per_s"))
        run.warmup_included = True
    peak = summary.get("peak_mem_bytes")
    if peak is None:
        rows = [r.value for r in curves.get("peak_mem_bytes", []) if math.isfinite(r.value)]
        peak = max(rows) if rows else None
    run.peak_mem_bytes = _finite(peak)
    run.peak_mem_kind = summary.get("peak_mem_kind") or ("rss" if run.device == "cpu" else None)
    if run.status == "completed":  # a final loss only exists at the end of the budget
        final = summary.get("final_val_loss")
        if final is None and curves.get("val_loss"):
            final = curves["val_loss"][-1].value
        run.final_val_loss = _finite(final)
    run.tokens = summary.get("tokens")
    run.train_loss = {r.step: r.value for r in curves.get("train_loss", [])}
    run.events = store.event_counts(rid)
    return run


# ---- the addendum ------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def _measured(run: _Run) -> bool:
    """Speed and memory were measured through the run (a diverged run's too, up to its end)."""
    return run.status in ("completed", "diverged")


def _arm_row(arm: str, runs: list[_Run]) -> dict[str, Any]:
    used = [r for r in runs if _measured(r)]
    tps = [r.tokens_per_s for r in used if r.tokens_per_s is not None]
    step = [r.step_time_s for r in used if r.step_time_s is not None]
    peaks = [r.peak_mem_bytes for r in used if r.peak_mem_bytes is not None]
    finals = [r.final_val_loss for r in used if r.final_val_loss is not None]
    if len(tps) >= 2:
        spread, spread_over = _std(tps), f"{len(tps)} seeds"
    elif len(used) == 1 and len(used[0].interval_tokens_per_s) >= 2:
        intervals = used[0].interval_tokens_per_s
        spread, spread_over = _std(intervals), f"{len(intervals)} log intervals of one run"
    else:
        spread, spread_over = None, None
    kinds = {r.peak_mem_kind for r in used if r.peak_mem_kind}
    return {
        "arm": arm,
        "step_time_s": _mean(step),
        "tokens_per_s": _mean(tps),
        "tokens_per_s_std": spread,
        "peak_mem_bytes": _mean(peaks),
        "final_val_loss": _mean(finals),
        "n": len(used),
        # detail
        "spread_over": spread_over,
        "peak_mem_std": _std(peaks),
        "peak_mem_kind": kinds.pop() if len(kinds) == 1 else None,
        "final_val_loss_std": _std(finals),
        "n_final": len(finals),
        "seeds": sorted(r.seed for r in used),
        "run_ids": [r.run_id for r in used],
        "statuses": {r.run_id: r.status for r in runs},
        "warmup_included": any(r.warmup_included for r in used),
    }


def _changed(ref: _Run, run: _Run) -> dict[str, tuple[Any, Any]]:
    skip = {"train.seed"}
    paths = sorted(set(ref.flat) | set(run.flat))
    return {p: (ref.flat.get(p), run.flat.get(p)) for p in paths
            if p not in skip and repr(ref.flat.get(p)) != repr(run.flat.get(p))}


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


def _behaviour(ref_runs: list[_Run], runs: list[_Run]) -> dict[str, Any]:
    """The arm's curves against the reference's, seed by seed, judged against the tolerance."""
    by_seed = {r.seed: r for r in ref_runs}
    pairs = [(by_seed[r.seed], r) for r in runs if r.seed in by_seed and r.train_loss
             and by_seed[r.seed].train_loss]
    if not pairs:
        return {"verdict": "not_comparable", "tolerance": None, "why": "no run shares a seed "
                "with a reference run that logged a train-loss curve", "pairs": 0}
    ref0, run0 = pairs[0]
    changed = _changed(ref0, run0)
    device = run0.device if run0.device == ref0.device else "cuda"
    precisions = [ref0.flat.get("train.precision", "fp32"), run0.flat.get("train.precision", "fp32")]
    tf32 = bool(ref0.flat.get("train.tf32")) or bool(run0.flat.get("train.tf32"))
    tol, why = expected_tolerance(changed, device, precisions, tf32)
    per_seed = {}
    for ref, run in pairs:
        per_seed[run.seed] = compare_curves(ref.train_loss, run.train_loss, tol)
    comps = list(per_seed.values())
    maxes = [c["max_abs_diff"] for c in comps if c["max_abs_diff"] is not None]
    all_diffs_mean = [c["mean_abs_diff"] for c in comps if c["mean_abs_diff"] is not None]
    firsts = [c["first_step_over_tolerance"] for c in comps
              if c["first_step_over_tolerance"] is not None]
    statuses = {(ref.status, run.status) for ref, run in pairs if ref.status != run.status}
    stopped = [run.seed for ref, run in pairs if run.status != ref.status]
    missing = sum(c["missing_steps"] for c in comps)
    out = {
        "changed": {p: list(v) for p, v in changed.items()},
        "device": device,
        "tolerance": tol,
        "why": why,
        "pairs": len(pairs),
        "steps": max(c["steps"] for c in comps),
        "max_abs_diff": max(maxes) if maxes else None,
        "mean_abs_diff": float(np.mean(all_diffs_mean)) if all_diffs_mean else None,
        "bit_identical": bool(maxes) and max(maxes) == 0.0 and not firsts,
        "first_step_over_tolerance": min(firsts) if firsts else None,
        "status_mismatch_seeds": stopped,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "statuses": sorted(statuses),
    }
    if tol is None:
        out["verdict"] = "no_tolerance"
    elif firsts or stopped or missing:
        out["verdict"] = "differs"
    else:
        out["verdict"] = "equivalent"
    return out


def _conditions(runs: list[_Run]) -> tuple[dict[str, str], dict[str, Any]]:
    """The template's measurement conditions, as lines to fill in and as checks."""
    # Planned: the budget's tokens (equal_tokens plans always set them), else what a run reached.
    planned = {r.run_id: r.flat.get("budget.tokens") for r in runs}
    done = [r for r in runs if r.status == "completed" and r.tokens is not None]
    reached = sorted({r.tokens for r in done})
    budgets = sorted({t for t in planned.values() if t is not None})
    targets = budgets if budgets else reached
    tokens_ok = (len(targets) == 1 and all(t == targets[0] for t in reached)
                 and (not budgets or None not in planned.values()))
    if tokens_ok:
        tokens_text = f"{targets[0]:,} tokens in every run (yes)"
    else:
        tokens_text = (f"NO: planned {' / '.join(f'{t:,}' for t in budgets) or 'no token budget'}"
                       f", completed runs saw {' / '.join(f'{t:,}' for t in reached) or 'none'}")

    seeds_by_arm: dict[str, tuple[int, ...]] = {}
    for r in runs:
        seeds_by_arm[r.arm] = (*seeds_by_arm.get(r.arm, ()), r.seed)
    seed_sets = {tuple(sorted(s)) for s in seeds_by_arm.values()}
    seeds_ok = len(seed_sets) == 1
    seeds_text = (f"seed{'s' if len(next(iter(seed_sets))) > 1 else ''} "
                  f"{', '.join(map(str, next(iter(seed_sets))))} in every arm (yes)" if seeds_ok
                  else "NO: " + "; ".join(f"{a}: {list(s)}" for a, s in seeds_by_arm.items()))

    batch_keys = ("train.batch_size", "train.batch_ramp_steps", "train.batch_size_start")
    batches = {tuple(r.flat.get(k) for k in batch_keys) for r in runs}
    batch_ok = len(batches) == 1
    micro = {}
    for r in runs:
        bs, acc = r.flat.get("train.batch_size"), r.flat.get("train.grad_accum", 1)
        micro.setdefault(r.arm, f"{bs // acc} x {acc}" if bs and acc else "?")
    sizes = sorted({b[0] for b in batches}, key=repr)
    if batch_ok:
        batch_text = f"{sizes[0]} sequences per optimizer step in every arm (yes)"
        if len(set(micro.values())) > 1:
            batch_text += "; micro-batch x accumulation steps: " + ", ".join(
                f"{a} {m}" for a, m in micro.items())
    else:
        batch_text = "NO: " + ", ".join(f"{a}: batch_size {r}" for a, r in
                                        {r.arm: r.flat.get("train.batch_size") for r in runs}.items())
    texts = {"fixed_tokens": tokens_text, "same_seed": seeds_text,
             "same_effective_batch": batch_text}
    checks = {
        "fixed_tokens": {"ok": tokens_ok, "planned": budgets, "reached": reached},
        "same_seed": {"ok": seeds_ok, "seeds": {a: list(s) for a, s in seeds_by_arm.items()}},
        "same_effective_batch": {"ok": batch_ok, "batch_size": sizes, "micro_batches": micro},
    }
    return texts, checks


def _pct(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return 100.0 * (a / b - 1.0)


def _speed_spread(row: Mapping[str, Any], ref: Mapping[str, Any]) -> float | None:
    """Spread of the % change, propagated from both arms' tokens/sec spreads."""
    a, b = row["tokens_per_s"], ref["tokens_per_s"]
    sa, sb = row["tokens_per_s_std"], ref["tokens_per_s_std"]
    if not a or not b or sa is None or sb is None:
        return None
    return 100.0 * (a / b) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)


def _comparison(row: dict[str, Any], ref_row: dict[str, Any]) -> dict[str, Any]:
    saved = (ref_row["peak_mem_bytes"] - row["peak_mem_bytes"]
             if row["peak_mem_bytes"] is not None and ref_row["peak_mem_bytes"] is not None
             else None)
    return {
        "memory_saved_bytes": saved,
        "memory_saved_pct": (100.0 * saved / ref_row["peak_mem_bytes"]
                             if saved is not None and ref_row["peak_mem_bytes"] else None),
        "speed_change_pct": _pct(row["tokens_per_s"], ref_row["tokens_per_s"]),
        "speed_change_spread_pct": _speed_spread(row, ref_row),
        "step_time_change_pct": _pct(row["step_time_s"], ref_row["step_time_s"]),
        "final_val_loss_diff": (row["final_val_loss"] - ref_row["final_val_loss"]
                                if row["final_val_loss"] is not None
                                and ref_row["final_val_loss"] is not None else None),
    }


def _memory_line(arm: str, ref: str, c: Mapping[str, Any], kind: str) -> str:
    saved, pct = c["memory_saved_bytes"], c["memory_saved_pct"]
    if saved is None:
        return f"{arm}: not measured"
    word = "less" if saved > 0 else "more"
    text = f"{arm}: {_mib(abs(saved))} {word} than {ref}"
    return text + (f" ({-pct:+.1f}%; {kind})" if pct is not None else f" ({kind})")


def _speed_line(arm: str, ref: str, c: Mapping[str, Any], spread_over: str | None) -> str:
    pct = c["speed_change_pct"]
    if pct is None:
        return f"{arm}: not measured"
    spread = c["speed_change_spread_pct"]
    text = f"{arm}: {pct:+.1f}% tokens/sec vs {ref}"
    if spread is not None:
        text += f" (± {spread:.1f}%: std over {spread_over})"
    else:
        text += " (no spread: one measurement)"
    return text


def _behaviour_line(arm: str, ref: str, b: Mapping[str, Any]) -> str:
    verdict = b["verdict"]
    if verdict == "not_comparable":
        return f"{arm}: not comparable ({b['why']})"
    mx, mean = b.get("max_abs_diff"), b.get("mean_abs_diff")
    seeds = f" x {b['pairs']} seeds" if b["pairs"] > 1 else ""
    stats = (f"max |Δ train loss| {mx:.2g}, mean {mean:.2g} over {b['steps']} steps{seeds}"
             if mx is not None else "no finite differences")
    if b.get("bit_identical"):
        stats = f"bit-identical over {b['steps']} steps"
    tol = b["tolerance"]
    if verdict == "no_tolerance":
        return f"{arm}: expected to differ from {ref}, {b['why']} ({stats})"
    if verdict == "equivalent":
        return f"{arm}: equivalent within tolerance to {ref} ({stats}, tolerance {tol:g})"
    parts = []
    if b.get("first_step_over_tolerance") is not None:
        parts.append(f"from step {b['first_step_over_tolerance']}")
    if b.get("status_mismatch_seeds"):
        ref_status, arm_status = b["statuses"][0]
        parts.append(f"ended differently (reference {ref_status}, this arm {arm_status}) for "
                     f"seed(s) {', '.join(map(str, b['status_mismatch_seeds']))}")
    return (f"{arm}: differs from {ref} {' and '.join(parts) if parts else ''}".rstrip()
            + f" ({stats}, tolerance {tol:g})")


def systems_addendum(store: Store) -> dict[str, Any]:
    """Compute the addendum from every run in ``store`` and store it under ``systems/addendum``.
    The reference arm is the plan's, else the first arm."""
    rows = store.runs()
    if not rows:
        raise UserError("no runs in this experiment yet: nothing to compare", file=str(store.path))
    runs = [_read_run(store, row) for row in rows]
    arms: list[str] = []
    for r in runs:
        if r.arm not in arms:
            arms.append(r.arm)
    plan = store.get_result("experiment/plan") or {}
    reference = plan.get("reference") or arms[0]
    if reference not in arms:
        raise UserError(f"reference arm '{reference}' has no runs (arms: {', '.join(arms)})",
                        file=str(store.path))
    by_arm = {a: [r for r in runs if r.arm == a] for a in arms}
    table = [_arm_row(a, by_arm[a]) for a in arms]
    ref_row = next(t for t in table if t["arm"] == reference)
    kinds = {t["peak_mem_kind"] for t in table if t["peak_mem_kind"]}
    kind = ("peak RSS of the process, CPU" if kinds == {"rss"} else
            "peak CUDA memory allocated" if kinds == {"cuda_allocated"} else "peak memory")

    per_arm: dict[str, Any] = {}
    memory, speed, behaviour = [], [], []
    for row in table:
        arm = row["arm"]
        if arm == reference:
            continue
        comp = _comparison(row, ref_row)
        beh = _behaviour(by_arm[reference], by_arm[arm])
        lines = {"memory_saved": _memory_line(arm, reference, comp, kind),
                 "speed_change": _speed_line(arm, reference, comp, row["spread_over"]),
                 "behaviour": _behaviour_line(arm, reference, beh)}
        per_arm[arm] = comp | {"behaviour": beh, "lines": lines}
        memory.append(lines["memory_saved"])
        speed.append(lines["speed_change"])
        behaviour.append(lines["behaviour"])
    if not per_arm:
        none = f"only the reference arm ({reference}) ran: nothing to compare"
        memory, speed, behaviour = [none], [none], [none]

    texts, checks = _conditions(runs)
    notes = []
    if any("model.sdpa_backend" in c["behaviour"].get("changed", {}) and
           c["behaviour"].get("device") == "cpu" for c in per_arm.values()):
        notes.append("model.sdpa_backend pins a CUDA kernel; on CPU the pin is not applied, so "
                     "those arms ran the same attention kernel")
    fallbacks = [r.run_id for r in runs if r.events.get("compile_fallback")]
    if fallbacks:
        notes.append("torch.compile fell back to eager in " + ", ".join(fallbacks) +
                     " (compile_fallback events): those arms measured the uncompiled model")
    if any(t["warmup_included"] for t in table):
        notes.append("some runs logged a single interval: their speed includes the warm-up steps")
    result = {
        "reference": reference,
        "conditions": texts,
        "rows": table,
        "conclusions": {"memory_saved": "; ".join(memory), "speed_change": "; ".join(speed),
                        "behaviour": "; ".join(behaviour)},
        # detail
        "conditions_check": checks,
        "conditions_met": all(c["ok"] for c in checks.values()),
        "memory_kind": kind,
        "axis": plan.get("axis"),
        "comparisons": per_arm,
        "tolerances": {p: {"cpu": t.cpu, "cuda": t.cuda, "why": t.why}
                       for p, t in KNOB_TOLERANCE.items()},
        "notes": notes,
    }
    store.put_result(RESULT_KEY, result)
    return result


# ---- printing -----------------------------------------------------------------------------------


def print_systems(out_dir: Path) -> None:
    """``lmlab systems DIR``: compute the addendum from DIR's store, store it, print it."""
    from rich.console import Console
    from rich.table import Table

    out_dir = Path(out_dir)
    if not (out_dir / FILENAME).is_file():
        raise UserError(f"no lmlab results here ({FILENAME} missing)", file=str(out_dir))
    with Store(out_dir / FILENAME) as store:
        add = systems_addendum(store)
    console = Console(highlight=False, soft_wrap=True)
    console.print("[bold]Memory / Systems Experiment Addendum[/]")
    console.print("\nMeasurement Conditions")
    for label, key in (("Fixed tokens per run", "fixed_tokens"), ("Same seed", "same_seed"),
                       ("Same effective batch", "same_effective_batch")):
        console.print(f"  • {label}: {add['conditions'][key]}", markup=False)
    mem_label = "Peak VRAM" if add["memory_kind"].startswith("peak CUDA") else "Peak memory"
    table = Table("Config", "Step Time", "Tokens/sec", mem_label, "Final Val Loss", "n",
                  title=f"Compare (reference: {add['reference']}; {add['memory_kind']})")
    for r in add["rows"]:
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        if r["tokens_per_s_std"] is not None:
            tps += f" ± {r['tokens_per_s_std']:,.0f}"
        table.add_row(
            r["arm"],
            "n/a" if r["step_time_s"] is None else f"{r['step_time_s'] * 1000:.1f} ms",
            tps,
            "n/a" if r["peak_mem_bytes"] is None else _mib(r["peak_mem_bytes"]),
            "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}",
            str(r["n"]))
    console.print(table)
    console.print("Conclusion")
    for label, key in (("Memory saved", "memory_saved"), ("Speed change", "speed_change"),
                       ("Any training behavior difference", "behaviour")):
        console.print(f"  • {label}:", markup=False)
        lines = [c["lines"][key] for c in add["comparisons"].values()] or \
            [add["conclusions"][key]]
        for line in lines:
            console.print(f"      {line}", markup=False)
    for note in add["notes"]:
        console.print(f"  note: {note}", markup=False)
    if not add["conditions_met"]:
        console.print("[yellow]  the measurement conditions were NOT met: compare with care[/]")
