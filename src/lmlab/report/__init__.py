"""The report: the experiment template filled in from the store (Markdown, self-contained HTML,
PNG figures, summary.csv), side-by-side comparison of two experiments, and the Memory / Systems
addendum on the terminal.

``write_report`` and ``print_addendum`` are imported on first use (PEP 562): what ``lmlab
status`` and ``lmlab compare`` need must not pull in matplotlib and Jinja2.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lmlab.report.compare import Comparison, compare

_LAZY = {"ReportPaths": "render", "write_report": "render", "print_addendum": "terminal"}

__all__ = ["Comparison", "compare", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"lmlab.report.{_LAZY[name]}"), name)
