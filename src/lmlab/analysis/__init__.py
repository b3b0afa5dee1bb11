"""Analysis of stored runs: seed statistics, hypothesis verdicts, systems comparisons."""

from lmlab.analysis.stats import Summary, Welch, equivalent, seeds_needed, summarize, welch

__all__ = ["Summary", "Welch", "equivalent", "seeds_needed", "summarize", "welch"]
