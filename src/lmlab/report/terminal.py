"""The report's content on a terminal (rich): ``lmlab systems DIR`` prints the Memory / Systems
addendum from the same section content the report renders, computed on the fly from the store.
"""

from __future__ import annotations

from pathlib import Path

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
