"""The report's content on a terminal (rich): ``lmlab systems DIR`` prints the Memory / Systems
addendum from the same section content the report renders, computed on the fly from the store;
``lmlab status`` and ``lmlab plan`` print their tables through :func:`fit_table`, which never
cuts a cell to fit a narrow terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from lmlab.analysis.summary import load_experiment
from lmlab.errors import UserError
from lmlab.report.format import (
    NA,
    SUMMARY_FORMAT,
    Table,
    fixed,
    fmt_value,
    integer,
    seconds,
)
from lmlab.report.inputs import gather
from lmlab.report.sections import addendum as addendum_section

JUSTIFY = {"l": "left", "r": "right"}


def rich_table(table: Table, title: str | None = None, caption: str | None = None) -> RichTable:
    out = RichTable(title=title, caption=caption, caption_justify="left")
    for header, align in zip(table.headers, table.align, strict=True):
        out.add_column(header, justify=JUSTIFY[align])  # type: ignore[arg-type]
    for row in table.rows:
        out.add_row(*row)
    return out


def fit_table(table: Table, width: int, *, title: str | None = None,
              optional: Sequence[str] = ()) -> tuple[RichTable, list[str]]:
    """``table`` for a terminal ``width`` columns wide, never cutting a cell: numbers keep
    their width, text (run ids, statuses, events) wraps or folds onto more lines. When even
    that does not fit, the ``optional`` columns are left out, in the order given; returns the
    rich table and the headers left out (the caller says so).

    The widths are laid out here rather than by rich, which may cut a no-wrap cell ("com…")
    when a table is too wide: numbers get exactly their width, text columns the rest."""
    keep = list(range(len(table.headers)))
    for header in [None, *optional]:
        if header is not None and header in table.headers:
            keep.remove(table.headers.index(header))
        widths = [_min_width(table, i) for i in keep]
        free = width - sum(widths) - _GAP * (len(keep) - 1)
        if free >= 0:
            break
    fits = free >= 0
    if fits:  # the room left widens text columns, in order, up to their longest line
        for j, i in enumerate(keep):
            if table.align[i] != "r":
                extra = min(free, _max_width(table, i) - widths[j])
                widths[j] += max(extra, 0)
                free -= max(extra, 0)
    # No outer edge; a column is one space of padding and one of rule apart from the next.
    out = RichTable(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                    padding=(0, 1, 0, 0))
    for i, w in zip(keep, widths, strict=True):
        header = table.headers[i]
        if len(header) > w:  # the header wraps rather than widen its column
            header = header.replace(" ", "\n")
        # Too narrow even so: rich folds every cell (a number over two lines beats a cut one).
        out.add_column(header, justify=JUSTIFY[table.align[i]],  # type: ignore[arg-type]
                       width=w if fits else None, overflow="fold")
    for row in table.rows:
        out.add_row(*[row[i] for i in keep])
    dropped = [table.headers[i] for i in range(len(table.headers)) if i not in keep]
    return out, dropped


_GAP = 2  # characters between two columns
# Text cells fold past this width (a long run id takes two lines) rather than widen the table.
_FOLD = 16


def _min_width(table: Table, i: int) -> int:
    """The narrowest column ``i`` can be: a number's full width, a header's longest word, and
    a text cell's longest word up to _FOLD."""
    header = max(len(w) for w in table.headers[i].split() or [""])
    cells = [row[i] for row in table.rows]
    if table.align[i] == "r":
        return max([header, *(len(c) for c in cells)])
    words = [len(w) for c in cells for w in c.split()]
    return max([header, *(min(n, _FOLD) for n in words)])


def _max_width(table: Table, i: int) -> int:
    return max(len(c) for c in [table.headers[i], *(row[i] for row in table.rows)])


# The status table's columns: header, the status row's key and how it is written. Units are in
# the headers, so cells are bare numbers; the last ones are left out first on a narrow terminal.
# Final metrics are written at the report's precision (SUMMARY_FORMAT).
STATUS_COLUMNS = (
    ("run", "run_id", str), ("status", "status", str), ("steps", "steps", "integer"),
    ("tokens", "tokens", "integer"), ("val loss", "final_val_loss", "metric"),
    ("val ppl", "final_val_ppl", "metric"), ("bpb", "final_val_bpb", "metric"),
    ("word ppl", "final_val_word_ppl", "metric"), ("tok/s", "tokens_per_s", "metric"),
    ("peak MiB", "peak_mem_bytes", "metric"), ("events", "events", str),
)
STATUS_OPTIONAL = ("word ppl", "bpb", "tokens")


def status_table(rows: Sequence[dict[str, Any]], width: int,
                 title: str | None = None) -> tuple[RichTable, list[str]]:
    """``lmlab status``: one line per run (``lmlab.analysis.records.status_row``)."""
    table = Table([h for h, _, _ in STATUS_COLUMNS],
                  [[_status_cell(r, key, how) for _, key, how in STATUS_COLUMNS] for r in rows],
                  ["l" if how is str else "r" for _, _, how in STATUS_COLUMNS])
    return fit_table(table, width, title=title, optional=STATUS_OPTIONAL)


def _status_cell(row: dict[str, Any], key: str, how: object) -> str:
    value = row[key]
    if key == "status":
        # A run that did not complete has no final metrics: say where it stopped.
        stopped = row["stopped_at_step"]
        return value if stopped is None else f"{value} at step {stopped:,}"
    if key == "events":
        return ", ".join(f"{k}:{v}" for k, v in sorted(value.items())) or NA
    if how is str:
        return value
    if how == "integer" or value is None:
        return integer(value)
    decimals, scale, _ = SUMMARY_FORMAT[key]
    return fixed(value * scale, decimals)


def plan_table(record: dict[str, Any], variables: Sequence[str], width: int,
               title: str | None = None) -> tuple[RichTable, list[str]]:
    """``lmlab plan``: one line per planned run (``Plan.to_json``, with estimates when timed)."""
    # A variable by its last name (lr, batch_size) where that is unambiguous.
    leaves = [v.rsplit(".", 1)[-1] for v in variables]
    names = [leaf if leaves.count(leaf) == 1 else v
             for leaf, v in zip(leaves, variables, strict=True)]
    packed = any(r.get("pack") for r in record["runs"])
    rows = [[r["run_id"], r["arm"], str(r["seed"]),
             *[fmt_value(r["values"].get(v)) for v in variables],
             integer(r["tokens"]), integer(r["steps"]), str(r["effective_batch"]),
             *([r.get("pack") or NA] if packed else []),
             seconds(r.get("estimate_s"))] for r in record["runs"]]
    table = Table(["run", "arm", "seed", *names, "tokens", "steps", "eff. batch",
                   *(["pack"] if packed else []), "expected"],
                  rows, ["l", "l", "r"] + ["l"] * len(names) + ["r"] * 3
                  + (["l"] if packed else []) + ["r"])
    return fit_table(table, width, title=title, optional=("arm", "eff. batch", "tokens"))


def pack_lines(record: dict[str, Any]) -> list[str]:
    """`lmlab plan`'s packs: which runs train as one stacked model, and its estimate; why
    ``auto`` left runs unpacked."""
    lines = [f"pack {unit['name']}: {len(unit['runs'])} runs as one stacked model "
             f"({', '.join(unit['runs'])})"
             + (f", expected {seconds(unit['estimate_s'])}" if unit["estimate_s"] else "")
             for unit in record.get("packs", [])]
    return lines + ([record["pack_note"]] if record.get("pack_note") else [])


def print_addendum(directory: Path | str, console: Console | None = None) -> None:
    """The addendum of the experiment in ``directory``, whether or not its spec asked for one.
    Raises UserError when there is no store, or no run to compare."""
    exp = load_experiment(directory)
    inputs = gather(exp, addendum=True)
    if inputs.addendum is None:
        raise UserError(str(inputs.addendum_missing), file=str(exp.directory))
    content = addendum_section.section(inputs)
    assert content is not None and content.table is not None
    console = console or Console(highlight=False, soft_wrap=True)
    console.print("[bold]Memory / Systems Experiment Addendum[/]")
    console.print("\nMeasurement Conditions")
    for item in content.conditions:
        console.print(f"  • {item.label}: {item.value}", markup=False)
    console.print(rich_table(content.table, title=f"Compare (reference: {content.reference})"))
    console.print("Conclusion")
    for conclusion in content.conclusions:
        console.print(f"  • {conclusion.label}:", markup=False)
        for line in conclusion.lines:
            console.print(f"      {line}", markup=False)
    if content.notes:
        console.print("Notes")
        for note in content.notes:
            console.print(f"  • {note}", markup=False)


def rounds_table(rounds: list[dict[str, Any]], design: Any) -> tuple[RichTable, str]:
    """`lmlab plan`'s until-settled rounds (``design``: a driver.SequentialDesign), and the line
    that says when it stops and its worst case."""
    table = RichTable(title=f"until settled: at most {len(rounds)} rounds, {design.max_seeds} "
                            f"seeds per arm ({design.spending} spending, family-wise "
                            f"α = {design.alpha:g})")
    for col in ("round", "new seeds", "seeds per arm", "runs", "expected", "cumulative",
                "a check settles at p ≤"):
        table.add_column(col)
    for r in rounds:
        table.add_row(str(r["round"]), ", ".join(map(str, r["seeds"])), str(r["seeds_per_arm"]),
                      str(len(r["runs"])), seconds(r["expected_s"]), seconds(r["cumulative_s"]),
                      f"{r['boundary_p']:.3g}")
    worst = rounds[-1]["cumulative_s"]
    footer = ("it stops at the first look where every check is settled; worst case (every "
              "round): " + (f"{seconds(worst)} in sequence on this machine" if worst is not None
                            else "timed without --no-estimate"))
    return table, footer
