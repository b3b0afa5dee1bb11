"""The Memory / Systems Experiment Addendum in words: the measurement conditions, the Compare
table (Config | Step Time | Tokens/sec | Peak memory | Final Val Loss), the three conclusions
(memory saved, speed change, training-behaviour difference) one line per arm against the
reference, and notes on what the numbers do not show by themselves.

The numbers are :func:`lmlab.analysis.systems.systems_addendum`'s; the report and ``lmlab
systems`` both write this section's content, so they say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.analysis.systems import Addendum, ArmSystems, Behaviour, Comparison, Condition
from lmlab.report.format import (
    MEMORY_KIND_TEXT,
    Item,
    Table,
    fixed,
    integer,
    mib,
    milliseconds,
)
from lmlab.report.inputs import ReportInputs

# A run's whole-run tokens/sec and its steady state (after the first log interval) differ by more
# than this when the first steps cost extra (torch.compile, allocator warm-up): worth a note.
STEADY_GAP = 0.05
CONCLUSIONS = (("memory_saved", "Memory saved"), ("speed_change", "Speed change"),
               ("behaviour", "Any training behavior difference"))


@dataclass(frozen=True)
class Conclusion:
    """One conclusion of the template, one line per arm compared with the reference."""

    label: str
    lines: list[str]

    @property
    def value(self) -> str:
        return "; ".join(self.lines)


@dataclass(frozen=True)
class AddendumSection:
    present: bool
    note: str | None = None  # why a wanted addendum is not there
    conditions: list[Item] = field(default_factory=list)
    conditions_met: bool = True
    reference: str | None = None
    table: Table | None = None
    conclusions: list[Conclusion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def section(inputs: ReportInputs) -> AddendumSection | None:
    """None when the addendum is not wanted (the spec does not ask for it)."""
    if not inputs.addendum_wanted:
        return None
    add = inputs.addendum
    if add is None:
        return AddendumSection(present=False, note="The spec asks for this addendum, but it "
                               f"cannot be computed yet ({inputs.addendum_missing}).")
    rows = [[r.arm, milliseconds(r.step_time_s), integer(r.tokens_per_s), mib(r.peak_mem_bytes),
             fixed(r.final_val_loss, 4)] for r in add.rows]
    return AddendumSection(
        present=True, conditions=conditions(add), conditions_met=add.conditions_met,
        reference=add.reference,
        table=Table(["Config", "Step Time", "Tokens/sec", inputs.memory_label, "Final Val Loss"],
                    rows, ["l", "r", "r", "r", "r"]),
        conclusions=conclusions(add), notes=notes(add))


# -- measurement conditions ------------------------------------------------------------------


def conditions(add: Addendum) -> list[Item]:
    c = add.conditions
    return [Item("Fixed tokens per run", _fixed_tokens(c["fixed_tokens"])),
            Item("Same seed", _same_seed(c["same_seed"])),
            Item("Same effective batch", _same_batch(c["same_effective_batch"])),
            Item("Same hardware", _same_hardware(c["same_hardware"]))]


def _same_hardware(c: Condition) -> str:
    if c.ok:
        return "yes"
    return ("NO: " + "; ".join(c.detail["hardware"]) + ". Speed and memory are not compared "
            "across them; the loss comparisons stand")


def _fixed_tokens(c: Condition) -> str:
    planned, reached = c.detail["planned"], c.detail["reached"]
    if c.ok:
        return f"{integer((planned or reached)[0])} (yes)"
    return (f"NO: planned {' / '.join(integer(t) for t in planned) or 'no token budget'}, "
            f"completed runs saw {' / '.join(integer(t) for t in reached) or 'none'}")


def _same_seed(c: Condition) -> str:
    seeds: dict[str, list[int]] = c.detail["seeds"]
    if c.ok:
        return ", ".join(map(str, sorted(next(iter(seeds.values()))))) + " in every arm (yes)"
    return "NO: " + "; ".join(f"{arm}: {', '.join(map(str, sorted(s)))}"
                              for arm, s in seeds.items())


def _same_batch(c: Condition) -> str:
    sizes: dict[str, int | None] = c.detail["batch_size"]
    if not c.ok:
        return "NO: " + ", ".join(f"{arm}: batch_size {b}" for arm, b in sizes.items())
    text = f"{integer(next(iter(sizes.values())))} (yes)"
    micro: dict[str, tuple[int, int] | None] = c.detail["micro_batches"]
    if len(set(micro.values())) > 1:  # accumulation varies: say how each arm splits the batch
        text += "; micro-batch × accumulation steps: " + ", ".join(
            f"{arm} {m[0]} × {m[1]}" if m else f"{arm} ?" for arm, m in micro.items())
    return text


# -- conclusions -----------------------------------------------------------------------------


def conclusions(add: Addendum) -> list[Conclusion]:
    ref = add.reference
    if not add.comparisons:
        none = f"only the reference arm ({ref}) ran: nothing to compare"
        return [Conclusion(label, [none]) for _, label in CONCLUSIONS]
    rows = {r.arm: r for r in add.rows}
    kind = MEMORY_KIND_TEXT.get(add.memory_kind or "", "peak memory")
    comps = add.comparisons.values()
    lines = {"memory_saved": [memory_line(c, ref, kind) for c in comps],
             "speed_change": [speed_line(c, ref, rows[c.arm]) for c in comps],
             "behaviour": [behaviour_line(c.arm, ref, c.behaviour) for c in comps]}
    if not add.conditions["same_hardware"].ok:  # refused, not merely unmeasured
        refused = [f"not compared: the runs ran on different hardware "
                   f"({'; '.join(add.conditions['same_hardware'].detail['hardware'])})"]
        lines["memory_saved"] = lines["speed_change"] = refused
    return [Conclusion(label, lines[key]) for key, label in CONCLUSIONS]


def memory_line(c: Comparison, ref: str, kind: str) -> str:
    saved, pct = c.memory_saved_bytes, c.memory_saved_pct
    if saved is None:
        return f"{c.arm}: not measured"
    text = f"{c.arm}: {mib(abs(saved))} {'less' if saved > 0 else 'more'} than {ref}"
    return text + (f" ({-pct:+.1f}%; {kind})" if pct is not None else f" ({kind})")


def speed_line(c: Comparison, ref: str, row: ArmSystems) -> str:
    pct = c.speed_change_pct
    if pct is None:
        return f"{c.arm}: not measured"
    text = f"{c.arm}: {pct:+.1f}% tokens/sec vs {ref}"
    if c.speed_change_spread_pct is None:
        return text + " (no spread: one measurement)"
    return text + f" (± {c.speed_change_spread_pct:.1f}%: std over {row.spread_over})"


def behaviour_line(arm: str, ref: str, b: Behaviour) -> str:
    if b.verdict == "not_comparable":
        return f"{arm}: not comparable ({b.why})"
    seeds = f" x {b.pairs} seeds" if b.pairs > 1 else ""
    if b.bit_identical:
        stats = f"bit-identical over {b.steps} steps"
    elif b.max_abs_diff is not None:
        stats = (f"max |Δ train loss| {b.max_abs_diff:.2g}, mean {b.mean_abs_diff:.2g} over "
                 f"{b.steps} steps{seeds}")
    else:
        stats = "no finite differences"
    if b.verdict == "no_tolerance":
        return f"{arm}: expected to differ from {ref}, {b.why} ({stats})"
    if b.verdict == "equivalent":
        return f"{arm}: equivalent within tolerance to {ref} ({stats}, tolerance {b.tolerance:g})"
    parts = []
    if b.first_step_over_tolerance is not None:
        parts.append(f"from step {b.first_step_over_tolerance}")
    if b.status_mismatch:
        _, ref_status, arm_status = b.status_mismatch[0]
        parts.append(f"ended differently (reference {ref_status}, this arm {arm_status}) for "
                     f"seed(s) {', '.join(str(s) for s, _, _ in b.status_mismatch)}")
    where = f" {' and '.join(parts)}" if parts else ""
    return f"{arm}: differs from {ref}{where} ({stats}, tolerance {b.tolerance:g})"


# -- notes -----------------------------------------------------------------------------------


def notes(add: Addendum) -> list[str]:
    out = []
    if not add.conditions_met:
        out.append("the measurement conditions were NOT met: compare with care")
    if add.sdpa_pin_on_cpu:
        out.append("model.sdpa_backend pins a CUDA kernel; on CPU the pin is not applied, so "
                   "those arms ran the same attention kernel")
    if add.compile_fallbacks:
        out.append("torch.compile fell back to eager in " + ", ".join(add.compile_fallbacks)
                   + " (compile_fallback events): those arms measured the uncompiled model")
    for r in add.rows:
        whole, steady = r.tokens_per_s, r.steady_tokens_per_s
        if whole and steady and abs(steady / whole - 1) > STEADY_GAP:
            out.append(f"{r.arm}: the table's {integer(whole)} tokens/sec are over the whole "
                       f"run; after its first log interval it ran at {integer(steady)} "
                       f"({100 * (steady / whole - 1):+.1f}%): one-off costs of the first steps "
                       "(torch.compile, allocator warm-up) are in the whole-run figure")
    return out
