"""The report: the experiment template filled in from the store (Markdown, self-contained HTML,
PNG figures, summary.csv), and side-by-side comparison of two experiments."""

from lmlab.report.compare import Comparison, compare
from lmlab.report.render import ReportPaths, write_report

__all__ = ["Comparison", "ReportPaths", "compare", "write_report"]
