"""The commands that read what experiments left: `lmlab status`, `report`, `compare`,
`systems`, `export`, `doctor` and `serve`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli import app, console, out
from lmlab.errors import UserError


@app.command()
def status(
    directory: Annotated[Path, typer.Argument(help="an output directory of lmlab train / run")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable (stable interface)")] = False,
) -> None:
    """Per run: status, steps, tokens, final validation metrics, speed, memory, events."""
    from lmlab.analysis.records import load_runs, status_row
    from lmlab.names import Role
    from lmlab.report.terminal import status_table
    from lmlab.store import Store

    with Store.existing(directory) as store:
        rows = [status_row(r) for r in load_runs(store, role=None)]
    if as_json:  # every run, each with its role
        out.print_json(json.dumps(rows))
        return
    # A nuisance sweep's tuning runs in a table of their own: they chose each arm's value, and
    # no statistic reads them with the confirmation runs.
    tuning = [r for r in rows if r["role"] == Role.TUNING]
    groups = [(tuning, f"{directory}: tuning runs (nuisance sweep)")] if tuning else []
    groups.append(([r for r in rows if r["role"] != Role.TUNING],
                   f"{directory}: confirmation runs" if tuning else str(directory)))
    for group, title in groups:
        table, dropped = status_table(group, out.width, title=title)
        out.print(table)
        if dropped:
            console.print(f"(too narrow for {', '.join(dropped)}: widen the terminal, or --json)")


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="an experiment directory")]) -> None:
    """Write the template back filled in: DIR/report.md, DIR/report.html, DIR/summary.csv."""
    from lmlab.report import write_report

    with console.status("writing the report..."):
        paths = write_report(directory)
    out.print(f"wrote {paths.markdown}\nwrote {paths.html}\nwrote {paths.csv}")


@app.command()
def compare(
    dir_a: Annotated[Path, typer.Argument(help="an experiment directory")],
    dir_b: Annotated[Path, typer.Argument(help="another experiment directory")],
    markdown: Annotated[bool, typer.Option("--markdown", help="print Markdown instead")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="where to write compare.md and overlay.png (default: "
        "compare-A-vs-B beside DIR_A)")] = None,
) -> None:
    """Two experiments side by side: per-arm summaries, and their curves overlaid."""
    from lmlab.report import compare as do_compare

    result = do_compare(dir_a, dir_b)
    if markdown:
        out.print(result.markdown(), markup=False, highlight=False)
    else:
        out.print(result.table())
    where = out_dir or dir_a.resolve().parent / f"compare-{dir_a.resolve().name}-vs-" \
        f"{dir_b.resolve().name}"
    md, png = result.write(where)
    for path in (md, png):
        if path is not None:
            console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def systems(directory: Annotated[Path, typer.Argument(help="an experiment directory")]) -> None:
    """The Memory / Systems addendum of an experiment, in the terminal.

    Step time, tokens/sec, peak memory and final validation loss per arm against the reference
    arm, with the memory saved, the speed change and the behaviour difference; computed from
    the store, for any experiment with runs."""
    from lmlab.report import print_addendum

    print_addendum(directory)


@app.command()
def export(
    directory: Annotated[Path, typer.Argument(help="an experiment directory")],
    to: Annotated[str, typer.Option("--to", help="tensorboard | wandb | mlflow")],
    dest: Annotated[Path | None, typer.Option(help="where to write (default DIR/<target>)")] = None,
) -> None:
    """Copy every run (config, metrics by step, events, summary) to a tracker."""
    from lmlab.export import export as do_export

    with console.status(f"exporting to {to}..."):
        where = do_export(directory, to, dest)
    out.print(f"exported {directory} to {to}: {where}")


PLAIN = {"markup": False, "highlight": False, "soft_wrap": True}  # paths and SQLite's words as is


@app.command()
def doctor(
    directory: Annotated[Path, typer.Argument(help="an experiment directory")],
    recover: Annotated[bool, typer.Option("--recover", help="copy what can be read into a new "
                                          "store and put it in place; the damaged file is kept "
                                          "aside")] = False,
) -> None:
    """Check the store's integrity; with --recover, rebuild it from what can be read.

    The damaged file is never changed: it is kept aside."""
    from lmlab.execute.lease import hold_directory
    from lmlab.store import doctor as store_doctor

    if not directory.is_dir():
        raise UserError("no such experiment directory", file=str(directory))
    store_doctor.store_file(directory)  # a store (or its WAL) is there to look at
    with hold_directory(directory):  # nobody may be writing while it is checked or replaced
        diagnosis = store_doctor.diagnose(directory)
        lines = diagnosis.lines()
        if not diagnosis.whole and recover:
            lines += store_doctor.recover(directory).lines()
    for line in lines:
        out.print(line, **PLAIN)
    if not diagnosis.whole and not recover:
        out.print(f"`lmlab doctor {directory} --recover` copies what can be read into a new "
                  "store and keeps the damaged file aside", **PLAIN)
        raise typer.Exit(1)


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="an experiment directory, or a directory of "
                                                   "them (searched 4 levels down)")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free one)")] = 8765,
    host: Annotated[str, typer.Option(help="interface to listen on; anything but 127.0.0.1 "
                                           "or localhost exposes your results to the network")]
        = "127.0.0.1",
    refresh: Annotated[float, typer.Option(min=0.2, help="seconds between the page's polls "
                                           "of the stores")] = 2.0,
) -> None:
    """A live dashboard of the experiments under DIR: runs and curves, as they write.

    Reads every store read-only; never blocks or changes a running sweep."""
    if not directory.is_dir():
        raise UserError("not a directory", file=str(directory))
    try:
        from lmlab.serve.app import LOOPBACK
        from lmlab.serve.app import run as run_server
    except ImportError as e:
        raise UserError(f"lmlab serve needs the serve extra ({e.name or e} is missing): "
                        "pip install 'lmlab[serve]'") from None
    if host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this "
                      "port can read these experiments", highlight=False)

    def ready(url: str) -> None:
        out.print(f"lmlab dashboard of {directory.resolve()}: {url}   (Ctrl-C to stop)",
                  highlight=False, soft_wrap=True)
        # A parent waiting for the URL (a test, a notebook) reads it as soon as it is printed.
        sys.stdout.flush()

    run_server(directory, host=host, port=port, refresh_s=refresh, on_ready=ready)
