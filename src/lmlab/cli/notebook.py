"""The lab notebook's commands: `lmlab adopt` (a decision as a baseline file a later spec
extends), `note` (a researcher's note, stored with the experiment) and `notebook` (every
experiment under a directory, with its lineage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmlab.cli import app, out

PLAIN = {"markup": False, "highlight": False, "soft_wrap": True}


@app.command()
def adopt(
    directory: Annotated[Path, typer.Argument(help="an experiment directory")],
    arm: Annotated[str | None, typer.Option(help="adopt this arm (default: the report's "
                                            "decision, the best arm)")] = None,
    provisional: Annotated[bool, typer.Option(
        "--provisional", help="adopt a decision the report calls provisional (an inconclusive "
        "or refuted verdict, or a best arm tied within noise); the baseline says so")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="the baseline file to write "
                                                  "(default DIR/baseline.yaml)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing, different "
                                        "baseline file")] = False,
) -> None:
    """Write the experiment's decision as a baseline file for the next spec to extend."""
    from lmlab.notebook.adopt import adopt as do_adopt

    done = do_adopt(directory, arm=arm, provisional=provisional, out=out_file, force=force)
    b = done.baseline
    out.print(f"wrote {done.path} (digest {done.digest}): arm {b.origin.arm} of "
              f"{b.origin.experiment}, verdict {b.origin.verdict}"
              + (", PROVISIONAL" if b.provisional else ""), **PLAIN)
    out.print(f"a spec starts from it with  controlled: {{extends: {done.path}}}", **PLAIN)


@app.command()
def note(
    directory: Annotated[Path, typer.Argument(help="an experiment directory")],
    text: Annotated[str, typer.Argument(help="the note (quote it)")],
) -> None:
    """Store a note with the experiment (UTC timestamp); the report shows it."""
    from lmlab.errors import UserError
    from lmlab.store import Store, add_note

    if not text.strip():
        raise UserError("an empty note", field="TEXT")
    with Store.existing(directory) as store:
        stamp = add_note(store, text)
    out.print(f"noted in {directory} at {stamp}", **PLAIN)


@app.command()
def notebook(
    directory: Annotated[Path, typer.Argument(help="a directory of experiments (searched 4 "
                                                   "levels down)")],
) -> None:
    """Every experiment under DIR in time order: question, verdict, decision, lineage."""
    from lmlab.notebook.lineage import short_table, write_notebook

    md, html, found = write_notebook(directory)
    t = short_table(found)
    shown = Table(title=f"{directory}: {len(found)} experiments", show_lines=True)
    for h in t.headers:
        shown.add_column(h, overflow="fold")
    for row in t.rows:
        shown.add_row(*row)
    out.print(shown)
    out.print(f"wrote {md}\nwrote {html}", **PLAIN)
