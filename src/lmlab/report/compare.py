"""Two experiments side by side: each arm's seed summary, and whether the numbers can be
compared at all.

Per-token loss and perplexity depend on the tokenizer (a bigger vocabulary packs more text into
a token), and every number depends on the corpus; throughput and memory depend on the hardware.
The comparison says which of these differ instead of printing numbers that look comparable.
Bits per byte and word-level perplexity survive a tokenizer change on the same corpus.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table as RichTable

from lmlab.analysis.findings import memory_kind
from lmlab.analysis.summary import (
    X_LABEL,
    ArmSummary,
    Experiment,
    load_experiment,
    summarize_arms,
)
from lmlab.config import flatten
from lmlab.report.format import NA, SUMMARY_METRICS, Table, memory_label, metric_pm
from lmlab.report.markdown import md_cell, md_table
from lmlab.report.terminal import rich_table
from lmlab.store import hardware_summary

COLUMNS = ("Experiment", "Arm", "n", "Final val loss", "PPL", "Bits/byte", "Word PPL",
           "Tokens/sec", "Peak memory")


@dataclass
class Comparison:
    names: tuple[str, str]
    rows: list[list[str]]
    notes: list[str]
    comparable: bool  # False when corpus or tokenizer differ: losses are not on one scale
    experiments: tuple[Experiment, Experiment] | None = None

    def _table(self) -> Table:
        return Table(list(COLUMNS), self.rows, ["l", "l"] + ["r"] * (len(COLUMNS) - 2))

    def table(self) -> RichTable:
        """For the terminal (``rich.console.Console().print``)."""
        return rich_table(self._table(), title=f"{self.names[0]} vs {self.names[1]}",
                          caption="\n".join(self.notes) or None)

    def markdown(self, figure: str | None = None, x_key: str | None = None) -> str:
        lines = [f"## {md_cell(self.names[0])} vs {md_cell(self.names[1])}", "",
                 md_table(self._table())]
        if self.notes:
            lines += [""] + [f"- {md_cell(n)}" for n in self.notes]
        if figure is not None:
            lines += ["", f"![Train and validation loss of both experiments]({figure})", "",
                      f"*Train and validation loss vs {X_LABEL[x_key or 'tokens']}*: each arm's "
                      "mean over seeds with its min–max band; solid: "
                      f"{md_cell(self.names[0])}, dashed: {md_cell(self.names[1])}."]
        return "\n".join(lines) + "\n"

    @property
    def x_key(self) -> str:
        """The shared comparison axis of the two experiments, or tokens when they differ."""
        if self.experiments is None:
            return "tokens"
        a, b = self.experiments
        return a.x_key if a.x_key == b.x_key else "tokens"

    def write(self, out: Path) -> tuple[Path, Path | None]:
        """``out/compare.md`` and the overlay figure ``out/overlay.png`` (none when neither
        experiment has a loss curve yet)."""
        from lmlab.report.seedplots import overlay_figure  # matplotlib, only when drawing

        out.mkdir(parents=True, exist_ok=True)
        png = None
        if self.experiments is not None:
            png = overlay_figure(self.experiments, self.names, self.x_key, out / "overlay.png")
        md = out / "compare.md"
        md.write_text(self.markdown(png.name if png else None, self.x_key))
        return md, png


def compare(dir_a: Path | str, dir_b: Path | str) -> Comparison:
    """Per-arm summaries of two experiment directories, with comparability notes. Raises
    UserError when either directory has no store."""
    exp_a, exp_b = load_experiment(dir_a), load_experiment(dir_b)
    arms_a, arms_b = summarize_arms(exp_a), summarize_arms(exp_b)
    names = (exp_a.name, exp_b.name)
    if names[0] == names[1]:
        # Two runs of one spec: the directory tells them apart.
        names = (f"{exp_a.name} ({Path(dir_a).name})", f"{exp_b.name} ({Path(dir_b).name})")
    rows = _rows(names[0], arms_a) + _rows(names[1], arms_b)
    notes, comparable = _notes(exp_a, exp_b)
    return Comparison(names, rows, notes, comparable, (exp_a, exp_b))


def _rows(name: str, arms: Mapping[str, ArmSummary]) -> list[list[str]]:
    return [[name, arm, str(a.stats["final_val_loss"].n)]
            + [metric_pm(a, m) for m in SUMMARY_METRICS] for arm, a in arms.items()]


def _fingerprint(exp: Experiment, keys: tuple[str, ...]) -> set[tuple]:
    return {tuple(r.provenance.get(k) for k in keys) for r in exp.runs if r.provenance}


def _notes(a: Experiment, b: Experiment) -> tuple[list[str], bool]:
    notes = []
    comparable = True
    data_a, data_b = (_fingerprint(e, ("corpus", "data_hash")) for e in (a, b))
    if data_a and data_b and data_a != data_b:
        comparable = False
        notes.append("NOT COMPARABLE: the experiments trained and evaluated on different data "
                     f"({_describe(data_a)} vs {_describe(data_b)}).")
    tok_a, tok_b = (_fingerprint(e, ("tokenizer_hash", "vocab_size")) for e in (a, b))
    if tok_a and tok_b and tok_a != tok_b:
        comparable = False
        notes.append("NOT COMPARABLE per token: the tokenizers differ "
                     f"(vocabulary {_describe(tok_a, 1)} vs {_describe(tok_b, 1)}), so loss and "
                     "perplexity are per different units; bits per byte and word-level "
                     "perplexity are comparable if the data is the same.")
    hw_a = {hardware_summary(r.provenance) for r in a.runs if r.provenance}
    hw_b = {hardware_summary(r.provenance) for r in b.runs if r.provenance}
    if hw_a and hw_b and hw_a != hw_b:
        notes.append(f"Different hardware ({', '.join(sorted(hw_a))} vs {', '.join(sorted(hw_b))}):"
                     " tokens/sec and memory are not comparable.")
    mem_a, mem_b = memory_label(memory_kind(a)), memory_label(memory_kind(b))
    if mem_a != mem_b:
        notes.append(f"Peak memory is measured differently ({mem_a} vs {mem_b}).")
    else:
        notes.append(f"Peak memory column: {mem_a}.")
    caps = [frozenset(flatten(r.config).get("evaluation.max_batches") for r in e.runs)
            for e in (a, b)]
    if caps[0] != caps[1]:
        notes.append("The validation protocols differ (evaluation.max_batches): validation "
                     "numbers are over different amounts of text.")
    if not a.runs or not b.runs:
        notes.append("One of the experiments has no runs yet.")
    return notes, comparable


def _describe(prints: set[tuple], index: int = 0) -> str:
    return ", ".join(sorted(str(p[index]) if p[index] is not None else NA for p in prints))
