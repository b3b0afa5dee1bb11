"""The Overfit Sanity Template (Quick Preflight): the slice each configuration memorised, the
pass criteria met, and Pass / Fail per configuration and overall."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.report.format import CHECKED, NA, UNCHECKED, Item, Table, sig
from lmlab.report.inputs import ReportInputs

if TYPE_CHECKING:  # matplotlib: not needed to write a section
    from lmlab.report.plots import Figure


@dataclass(frozen=True)
class Preflight:
    ran: bool
    note: str | None  # why there is no result
    items: list[Item]  # dataset slice, batch size, steps run
    criteria: list[Item]
    result: list[Item]  # the Pass and Fail boxes
    table: Table | None
    figure: Figure | None


def _boxes(passed: bool | None) -> list[Item]:
    return [Item(CHECKED if passed is True else UNCHECKED, "Pass"),
            Item(CHECKED if passed is False else UNCHECKED, "Fail")]


def failure_reasons(c: Mapping[str, Any]) -> str:
    """Why one preflight configuration failed, criterion by criterion."""
    why = []
    final, threshold = c.get("final_loss"), c.get("threshold")
    if final is None or threshold is None or not (final < threshold):
        why.append(f"final loss {sig(final)} not below {sig(threshold)}")
    if c.get("nan"):
        why.append("NaN loss")
    if c.get("grads_finite") is False:
        why.append("non-finite gradients")
    return ", ".join(why) or "failed"


def section(inputs: ReportInputs) -> Preflight:
    pre = inputs.exp.preflight
    if pre is None:
        enabled = inputs.spec.preflight.enabled if inputs.spec else None
        why = ("disabled in the spec (preflight.enabled: false)" if enabled is False else
               "not run or skipped: no preflight result in the store")
        return Preflight(False, f"Preflight {why}.", [], [], _boxes(None), None, None)
    configs = pre.get("configs", [])
    corpus = next((p.get("corpus") for p in inputs.provenances if p.get("corpus")), None)

    def common(key: str) -> str:
        vals = sorted({str(c.get(key)) for c in configs if c.get(key) is not None})
        return ", ".join(vals) if vals else NA

    slice_text = (f"the first {common('sequences')} training windows of {common('seq_len')} "
                  "tokens" + (f" of {corpus}" if corpus else ""))
    n = len(configs)
    below = sum(1 for c in configs if c.get("final_loss") is not None
                and c.get("threshold") is not None and c["final_loss"] < c["threshold"])
    no_nan = sum(1 for c in configs if not c.get("nan"))
    finite = sum(1 for c in configs if c.get("grads_finite", True))
    rows = [[str(c.get("key")), ", ".join(c.get("arms", [])), sig(c.get("lr")),
             str(c.get("batch_size")), str(c.get("steps")),
             f"{sig(c.get('initial_loss'))} → {sig(c.get('final_loss'))} "
             f"(threshold {sig(c.get('threshold'))})",
             "yes" if not c.get("nan") else "NO",
             "yes" if c.get("grads_finite", True) else "NO",
             "  ".join(f"{b.label} {b.value}" for b in _boxes(bool(c.get("passed"))))]
            for c in configs]
    return Preflight(
        ran=True, note=None,
        items=[Item("Dataset Slice", slice_text), Item("Batch Size", common("batch_size")),
               Item("Steps Run", common("steps"))],
        criteria=[Item("Loss → near zero", f"final loss below the threshold "
                                           f"({common('threshold')}) in {below} of {n} "
                                           "configurations"),
                  Item("No NaNs", f"{no_nan} of {n} configurations"),
                  Item("Gradients finite", f"{finite} of {n} configurations")],
        result=_boxes(bool(pre.get("passed"))),
        table=Table(["Config", "Arms", "LR", "Batch", "Steps", "Loss (initial → final)",
                     "No NaNs", "Grads finite", "Result"], rows,
                    ["l", "l", "r", "r", "r", "r", "l", "l", "l"]),
        figure=inputs.figures.get("preflight"))
