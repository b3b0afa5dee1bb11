"""The report's content on a terminal (rich): ``lmlab systems DIR`` prints the Memory / Systems
addendum from the same section content the report renders, computed on the fly from the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from lmlab.analysis.summary import load_experiment
from lmlab.errors import UserError
from lmlab.report.format import Table
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
