"""Section 6, Metrics to Log: for each metric the template names, whether the runs logged it and
where the report shows it; the figures follow."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmlab.names import (
    DIAG_ACT_RMS,
    DIAG_ATTN_ENTROPY,
    DIAG_NORM_GRAD,
    GRAD_NORM,
    PEAK_MEM,
    STEP_TIME,
    TRAIN_LOSS,
    VAL,
    VAL_LOSS,
    Event,
    eval_metric,
)
from lmlab.report.format import Item, plural
from lmlab.report.inputs import ReportInputs

if TYPE_CHECKING:  # matplotlib: not needed to write a section
    from lmlab.report.plots import Figure

# The curve figures, in the order section 6 shows them (loss_<x> only when x is not tokens).
CURVE_FIGURES = ("loss_tokens", "loss_{x}", "loss_per_seed", "grad_norm", "lr_schedule",
                 "speed_memory", "diagnostics")


@dataclass(frozen=True)
class Metrics:
    core: list[Item]
    stability: list[Item]
    optional: list[Item]
    figures: list[Figure]


def _status(flag: bool, where: str) -> str:
    return f"logged — {where}" if flag else "not logged"


def section(inputs: ReportInputs) -> Metrics:
    exp = inputs.exp
    names = {n for r in exp.runs for n in r.curves}
    ev = Counter(e["kind"] for r in exp.runs for e in r.events)

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    core = [
        Item("Train loss vs tokens", _status(TRAIN_LOSS in names, "figure: loss curves")),
        Item("Val loss vs tokens", _status(VAL_LOSS in names, "figure: loss curves")),
        Item("Perplexity", _status(eval_metric(VAL, "ppl") in names, "quantitative summary (8)")),
        Item("Step time", _status(STEP_TIME in names, "per log interval; quantitative summary "
                                                      "via tokens/sec")),
        Item("Peak memory", _status(PEAK_MEM in names, "figure: throughput and memory")),
    ]
    stability = [
        Item("Global gradient norm", _status(GRAD_NORM in names, "figure: gradient norm")),
        Item("NaNs / divergence events",
             f"{plural(ev.get(Event.NAN, 0), 'NaN event')} and "
             f"{plural(ev.get(Event.DIVERGENCE, 0), 'divergence event')} (marked on the "
             "train-loss curves)"),
        Item("Loss spikes", f"{plural(ev.get(Event.SPIKE, 0), 'spike event')} (marked on the "
                            "train-loss curves)"),
    ]
    optional = [
        Item("Activation norms (first/middle/last layer)",
             _status(has(DIAG_ACT_RMS), "figure: diagnostics")),
        Item("LN weight/bias gradient norms", _status(has(DIAG_NORM_GRAD),
                                                      "figure: diagnostics")),
        Item("Attention entropy", _status(has(DIAG_ATTN_ENTROPY),
                                          "figure: diagnostics (per layer; per head in the "
                                          "store)")),
    ]
    # dict.fromkeys: ordered and unique (x may be "tokens").
    order = dict.fromkeys(key.format(x=exp.x_key) for key in CURVE_FIGURES)
    return Metrics(core, stability, optional,
                   [inputs.figures[k] for k in order if k in inputs.figures])
