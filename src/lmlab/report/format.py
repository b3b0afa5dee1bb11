"""How the report writes a number, a setting and a table: one place, so the report, ``lmlab
compare``, ``lmlab systems``, ``lmlab status`` and the tests that parse them all agree.

Also the building blocks the templates lay out (:class:`Table`, :class:`Item`,
:class:`Question`): plain strings, no Markdown or HTML, so the Markdown and the HTML report (and
the terminal) say exactly the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lmlab.analysis.stats import Summary
from lmlab.analysis.summary import ArmSummary

NA = "—"  # not defined: never measured, or a final metric of a run that did not complete
CHECKED, UNCHECKED = "☑", "☐"


# -- building blocks -------------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    # "l" or "r" per column (numbers right-aligned).
    align: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.align:
            self.align = ["l"] * len(self.headers)


@dataclass
class Item:
    """A labelled line, as the template writes them: ``Label: value``."""

    label: str
    value: str
    note: str = ""


@dataclass
class Question:
    question: str
    answers: list[str]


# -- numbers ---------------------------------------------------------------------------------


def _non_finite(x: float) -> str:
    return "NaN" if math.isnan(x) else ("∞" if x > 0 else "-∞")


def fixed(x: float | None, decimals: int) -> str:
    """``x`` with ``decimals`` decimals and thousands separators; NaN reads as not defined."""
    if x is None or not math.isfinite(x):
        return NA if x is None or math.isnan(x) else _non_finite(x)
    return f"{x:,.{decimals}f}"


def sig(x: float | None, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits (losses, norms, thresholds of any scale)."""
    if x is None:
        return NA
    if not math.isfinite(x):
        return _non_finite(x)
    return f"{x:.{digits}g}"


def integer(x: float | None) -> str:
    return NA if x is None or not math.isfinite(x) else f"{round(x):,}"


def mib(x: float | None, decimals: int = 1) -> str:
    """Bytes as MiB (what allocators and RSS count in)."""
    return NA if x is None or not math.isfinite(x) else f"{x / 2**20:,.{decimals}f} MiB"


def milliseconds(x: float | None) -> str:
    """Seconds as milliseconds: a step time."""
    return NA if x is None or not math.isfinite(x) else f"{x * 1000:.1f} ms"


def seconds(x: float | None) -> str:
    """A duration in the unit a reader thinks in: seconds, minutes or hours."""
    if x is None or not math.isfinite(x):
        return NA
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def mean_pm(s: Summary, decimals: int, scale: float = 1.0, unit: str = "") -> str:
    """``mean ± std (n=k)``; the std is left out with one seed (there is none)."""
    if s.n == 0:
        return f"{NA} (n=0)"
    mean = fixed(s.mean * scale, decimals)
    if s.n < 2:
        return f"{mean}{unit} (n=1)"
    return f"{mean} ± {fixed(s.std * scale, decimals)}{unit} (n={s.n})"


# Display precision of every quantitative-summary column (decimals, scale, unit). Tests parse
# the table and compare with a recomputation at exactly this precision.
SUMMARY_FORMAT: dict[str, tuple[int, float, str]] = {
    "final_val_loss": (4, 1.0, ""), "final_val_ppl": (2, 1.0, ""),
    "final_val_bpb": (4, 1.0, ""), "final_val_word_ppl": (2, 1.0, ""),
    "tokens_per_s": (0, 1.0, ""), "peak_mem_bytes": (1, 2.0**-20, " MiB"),
}
# The per-arm columns of the quantitative summary and of ``lmlab compare``, in order.
SUMMARY_METRICS = tuple(SUMMARY_FORMAT)


def metric_pm(a: ArmSummary, metric: str) -> str:
    """One arm's seed summary of ``metric`` at its display precision."""
    decimals, scale, unit = SUMMARY_FORMAT.get(metric, (4, 1.0, ""))
    return mean_pm(a.stats[metric], decimals, scale, unit)


# -- settings --------------------------------------------------------------------------------


def fmt_value(v: Any) -> str:
    """A config value as a reader expects it: 0.001 not 1e-03, lists as tuples, None as —."""
    if v is None:
        return NA
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, list | tuple):
        return "(" + ", ".join(fmt_value(x) for x in v) + ")"
    return str(v)


def plural(n: int, word: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


# The template says "Peak VRAM"; on CPU the number is the process's peak RSS, and a column must
# say so rather than pass RSS off as GPU memory (kinds: lmlab.analysis.findings.memory_kind).
MEMORY_LABEL = {"cuda_allocated": "Peak VRAM", "rss": "Peak memory (RSS)",
                "mixed": "Peak memory (CUDA allocated / RSS)"}
# The same, as the addendum's conclusions word it.
MEMORY_KIND_TEXT = {"cuda_allocated": "peak CUDA memory allocated",
                    "rss": "peak RSS of the process, CPU"}


def memory_label(kind: str) -> str:
    return MEMORY_LABEL.get(kind, MEMORY_LABEL["mixed"])
