"""The ``lmlab`` command line (typer + rich).

Every error a user can cause ends as one line ``file:line field: message`` on stderr and exit
code 2; bugs keep their traceback.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from lmlab import __version__
from lmlab.errors import UserError


def _untyped_flags(params: list) -> list:
    """typer's rich help prints a type tag beside every option, flags included (``--json
    <bool>``, even ``--help <bool>``); a flag takes no value, so it gets no tag."""
    for p in params:
        if isinstance(p, TyperOption) and (p.is_flag or p.count) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _App(typer.Typer):
    """Every command help-formatted by :class:`_Command`, however it is declared."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Controlled language-model training experiments on WikiText-2.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        import platform

        import torch

        out.print(f"lmlab {__version__} (torch {torch.__version__}, python "
                  f"{platform.python_version()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print lmlab's version (and torch's and python's) and exit")] = False) -> None:
    # The group's own options; the help text is the app's.
    pass


# -- where the data comes from: the same options, and environment variables, for every command
# that loads data (run, plan, preflight, train) --------------------------------------------------

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="LMLAB_DATA_DIR", file_okay=False,
    help="a folder holding wikitext-2-raw-v1/ (wiki.{train,valid,test}.raw) and, for the gpt2 "
         "tokenizer, gpt2-tokenizer/; searched before the cache (~/.cache/lmlab) and the "
         "download")]
FallbackCorpus = Annotated[Path | None, typer.Option(
    "--fallback-corpus", envvar="LMLAB_FALLBACK_CORPUS", exists=True, file_okay=False,
    help="if WikiText-2 can be neither found nor downloaded, train on this local corpus "
         "folder (train.txt, valid.txt, test.txt) instead, recorded and reported under its own "
         "name")]


def _use_data_dir(data_dir: Path | None) -> None:
    """Worker processes inherit the environment: setting it here reaches every run."""
    if data_dir is not None:
        import os

        os.environ["LMLAB_DATA_DIR"] = str(data_dir.expanduser().resolve())


def _fmt(value: object, digits: int = 4) -> str:
    """A number as the report writes it (lmlab.report.format); anything else as it is."""
    from lmlab.report.format import sig

    return sig(value, digits) if value is None or isinstance(value, float) else str(value)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="a run config YAML: any of the sections data, "
                                                "tokenizer, model, optimizer, schedule, train, "
                                                "budget, evaluation (with diagnostics), cadence; "
                                                "what is left out keeps its default")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory "
                                                 "(default runs/<config name>)")] = None,
    data_dir: DataDir = None,
    fallback_corpus: FallbackCorpus = None,
) -> None:
    """Train one configuration and record everything about it in DIR/lmlab.sqlite."""
    from lmlab.analysis.records import load_runs
    from lmlab.config import RunConfig
    from lmlab.execute.local import run_single
    from lmlab.identity import run_id
    from lmlab.names import STORE_FILE, Status
    from lmlab.spec.load import load_yaml, upgrade_run_doc, validate
    from lmlab.store import Store

    _use_data_dir(data_dir)
    doc = upgrade_run_doc(load_yaml(config))
    cfg = validate(doc, RunConfig)
    base = config.parent.resolve()
    if fallback_corpus is not None:
        with doc.located():
            data = _fallback_data(cfg.data, base, fallback_corpus)
        cfg = cfg.model_copy(update={"data": data})
    out_dir = out_dir or Path("runs") / config.stem
    with doc.located():
        result = run_single(cfg, out_dir, run_id=run_id(config.stem, cfg.train.seed), base=base)
    with Store.existing(out_dir) as store:
        record = next(r for r in load_runs(store) if r.run_id == result.run_id)
    out.print(f"[bold]{result.run_id}[/]: {result.status}")
    for key in ("final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
                "tokens_per_s", "peak_mem_bytes"):
        out.print(f"  {key}: {_fmt(record.metrics.get(key))}")
    out.print(f"results: {out_dir / STORE_FILE}   (lmlab status {out_dir})")
    if result.status != Status.COMPLETED:
        raise typer.Exit(1)


@app.command()
def status(
    directory: Annotated[Path, typer.Argument(help="an output directory of lmlab train / run")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable (stable interface)")] = False,
) -> None:
    """Per run: status, steps, tokens, final validation metrics, speed, memory, events."""
    from lmlab.analysis.records import load_runs, status_row
    from lmlab.report.terminal import status_table
    from lmlab.store import Store

    with Store.existing(directory) as store:
        rows = [status_row(r) for r in load_runs(store)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table, dropped = status_table(rows, out.width, title=str(directory))
    out.print(table)
    if dropped:
        console.print(f"(too narrow for {', '.join(dropped)}: widen the terminal, or --json)")


def _plan(spec: Path, data_dir: Path | None = None, fallback: Path | None = None):
    """The spec's plan, its data found as ``--data-dir`` / ``--fallback-corpus`` (or their
    environment variables) say: the same for every command that loads data."""
    from lmlab.spec.expand import load_plan

    _use_data_dir(data_dir)
    p = load_plan(spec)
    if fallback is None:
        return p
    with p.doc.located("controlled"):
        swapped = _fallback_data(p.spec.controlled.data, p.base, fallback)
    return p.on_data(swapped)


def _warn(p, *, bound: bool = True) -> None:
    """Print the settings of plan ``p`` that cannot do what they say (and, with ``bound``,
    a budget this machine cannot finish in a day), each as ``file:line field: ...``."""
    from lmlab.execute.feasible import too_long
    from lmlab.spec.advice import advise

    items = advise(p)
    if bound and (slow := too_long(p)) is not None:
        items.append(slow)
    for a in items:
        console.print(f"warning: {p.doc.error(a.field, a.message)}", style="yellow",
                      markup=False, highlight=False)


def _placeholders(spec: Path) -> list[str]:
    return sorted(set(re.findall(r"__[A-Z]+__", spec.read_text())))


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="experiment name (letters, digits, _ . -); writes "
                                             "NAME.yaml")],
    category: Annotated[str, typer.Option(help="hyperparam | optimizer | memory | "
                                          "architecture | recipe: the template asks a question "
                                          "of this kind")] = "hyperparam",
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a new spec: every template section present, with the template's comments."""
    from lmlab.spec.template import CATEGORIES, NAME_PATTERN, render

    path = Path(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    stem = path.stem
    if not re.fullmatch(NAME_PATTERN, stem):
        raise UserError(f"{stem!r} cannot name an experiment: use letters, digits, '_', '.' and "
                        "'-', starting with a letter or digit (e.g. warmup-study)", field="NAME")
    if category not in CATEGORIES:
        raise UserError(f"unknown category {category!r}: choose one of {', '.join(CATEGORIES)}",
                        field="--category")
    if path.exists() and not force:
        raise UserError("exists already (use --force to overwrite)", file=str(path))
    path.write_text(render(stem, category))
    out.print(f"wrote {path}: fill in the __PLACEHOLDERS__, then `lmlab validate {path}`")


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")]) -> None:
    """Schema and control checks: exit 0 when the spec is valid, 2 with file:line otherwise."""
    plan = _plan(spec)
    out.print(f"{spec}: valid — {len(plan.arms)} arms × {len(plan.spec.meta.seeds)} seeds = "
              f"{len(plan.runs)} runs, axis {plan.spec.comparison_axis}, "
              f"independent: {', '.join(plan.variables)}")
    _warn(plan)
    if todo := _placeholders(spec):
        console.print(f"[yellow]note:[/] unfilled placeholders: {', '.join(todo)}")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    no_estimate: Annotated[bool, typer.Option("--no-estimate", help="skip timing real steps")] = False,
    data_dir: DataDir = None,
    fallback_corpus: FallbackCorpus = None,
    until_settled: Annotated[bool | None, typer.Option(
        "--until-settled/--fixed-seeds", help="plan the rounds of seeds an until-settled run "
        "may add (default: analysis.until_settled)")] = None,
    max_seeds: Annotated[int | None, typer.Option(
        "--max-seeds", min=2, help="until-settled: the cap on seeds per arm")] = None,
) -> None:
    """The table of runs and their expected wall-clock (timed on a few real steps per shape);
    until settled, the rounds and the worst case."""
    from lmlab.driver import design_of, plan_rounds
    from lmlab.execute.experiment import estimate, prepare_plan_data
    from lmlab.spec.expand import expand

    p = _plan(spec, data_dir, fallback_corpus)
    _warn(p, bound=no_estimate)  # a measured estimate says more than the bound
    design = design_of(p, until_settled, max_seeds)
    if design is not None:  # every run the rounds may add is timed and listed
        p = expand(p.spec, p.doc, seeds=sorted(design.seeds_through(len(design.rounds))))
    if no_estimate:
        record = p.to_json()
    else:
        with console.status("timing a few real steps of each shape..."), p.doc.located("controlled"):
            record = estimate(p, None, prepare_plan_data(p))
    if design is not None:
        estimates = {r["run_id"]: r.get("estimate_s") for r in record["runs"]}
        record["rounds"] = plan_rounds(p, design, estimates)
        record["sequential"] = design.to_json()
    if as_json:
        out.print_json(json.dumps(record))
        return
    from lmlab.report.format import seconds
    from lmlab.report.terminal import plan_table

    table, dropped = plan_table(record, p.variables, out.width, title=f"{p.spec.meta.name}: "
                                f"{len(p.runs)} runs, {p.spec.comparison_axis}")
    out.print(table)
    if dropped:
        console.print(f"(too narrow for {', '.join(dropped)}: widen the terminal, or --json)")
    if design is not None:
        from lmlab.report.terminal import rounds_table

        table, footer = rounds_table(record["rounds"], design)
        out.print(table)
        out.print(footer)
    elif (total := record.get("estimate_total_s")) is not None:
        from lmlab.execute.feasible import DAY_S

        out.print(f"expected wall-clock in total: {seconds(total)} (runs in sequence on this "
                  "machine)")
        if total > DAY_S:
            console.print(f"warning: that is {total / DAY_S:,.1f} days: shrink the budget or the "
                          "model, or run on faster hardware", style="yellow", markup=False)


@app.command()
def preflight(
    spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="experiment directory "
                                                 "(default runs/<name>)")] = None,
    data_dir: DataDir = None,
    fallback_corpus: FallbackCorpus = None,
) -> None:
    """The Overfit Sanity Template for each distinct configuration; Pass/Fail in the store."""
    from lmlab.execute.experiment import open_experiment, run_preflight
    from lmlab.execute.lease import hold_directory

    p = _plan(spec, data_dir, fallback_corpus)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    with hold_directory(out_dir):  # one driver writes the directory at a time
        open_experiment(p, out_dir)
        with console.status("preflight: overfitting a tiny slice..."), p.doc.located("controlled"):
            record = run_preflight(p, out_dir)
    table = Table(title="Overfit Sanity (preflight)")
    for col in ("arms", "steps", "initial loss", "final loss", "threshold", "NaN", "grads finite", "result"):
        table.add_column(col)
    for c in record["configs"]:
        table.add_row(", ".join(c["arms"]), str(c["steps"]), _fmt(c["initial_loss"]),
                      _fmt(c["final_loss"]), _fmt(c["threshold"]), str(c["nan"]),
                      str(c["grads_finite"]), "PASS" if c["passed"] else "FAIL")
    out.print(table)
    if not record["passed"]:
        raise typer.Exit(1)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="experiment directory "
                                                 "(default runs/<name>)")] = None,
    skip_preflight: Annotated[bool, typer.Option(
        "--skip-preflight", help="start the runs without the Overfit Sanity preflight (a "
        "passed preflight is remembered anyway)")] = False,
    force_new: Annotated[bool, typer.Option("--force-new", help="the spec changed: move the "
                                            "old results aside and start a new experiment")] = False,
    parallel: Annotated[int | None, typer.Option(min=1, help="concurrent runs (default: one "
                                                 "per GPU, or one on CPU)")] = None,
    data_dir: DataDir = None,
    fallback_corpus: FallbackCorpus = None,
    until_settled: Annotated[bool | None, typer.Option(
        "--until-settled/--fixed-seeds", help="after the declared seeds, add seeds to every "
        "arm in rounds until every check is supported or refuted, or --max-seeds is reached "
        "(group-sequential, the whole procedure at analysis.alpha; default: "
        "analysis.until_settled)")] = None,
    max_seeds: Annotated[int | None, typer.Option(
        "--max-seeds", min=2, help="until-settled: the cap on seeds per arm (default: "
        "analysis.max_seeds)")] = None,
) -> None:
    """Preflight, then every arm x seed, each in its own process. Rerun to resume."""
    from lmlab import driver
    from lmlab.names import STORE_FILE, Status

    p = _plan(spec, data_dir, fallback_corpus)
    _warn(p)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    with p.doc.located("controlled"):
        result = driver.run(p, out_dir, until_settled=until_settled, max_seeds=max_seeds,
                            skip_preflight=skip_preflight, force_new=force_new,
                            parallel=parallel)
    if result.moved:
        console.print(f"previous results moved to {result.moved}")
    counts = Counter(result.results.values())
    out.print(f"{p.spec.meta.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if result.sequential is not None and (looks := (record := result.sequential)["looks"]):
        last = looks[-1]
        out.print(f"look {last['look']} ({len(last['seeds'])} seeds per arm): verdict "
                  f"{last['verdict']}" + (f"; stopped: {record['stopped']['reason']}"
                                          if record.get("stopped") else ""))
    out.print(f"results: {out_dir / STORE_FILE}   next: lmlab report {out_dir}")
    if any(counts.get(s) for s in (Status.INTERRUPTED, Status.FAILED, Status.PENDING)):
        raise typer.Exit(1)


def _fallback_data(data, base: Path, corpus: Path):
    """``data``, or the fallback corpus's config when ``data``'s WikiText-2 is not here (said
    on stderr: every record and the report name the corpus used)."""
    from lmlab.data.wikitext import with_fallback

    swapped, why = with_fallback(data, base, corpus)
    if why is not None:
        console.print(f"[yellow]WikiText-2 is not available here[/] ({why.splitlines()[0][:160]})"
                      f"\n[yellow]training on the local corpus {corpus} instead; every record "
                      "and the report name it as what it is, not WikiText-2[/]", soft_wrap=True)
    return swapped


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
) -> None:
    """Two experiments' per-arm summaries side by side."""
    from lmlab.report import compare as do_compare

    result = do_compare(dir_a, dir_b)
    if markdown:
        out.print(result.markdown(), markup=False, highlight=False)
    else:
        out.print(result.table())


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
    """Check the store with SQLite's integrity check and, with --recover, rebuild it from what
    can still be read. The damaged file is never changed."""
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
    """A live dashboard of the experiments under DIR: runs and curves, refreshing while runs
    write. Reads every store read-only; never blocks or changes a running sweep."""
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


def main() -> None:
    """Console entry point: user errors exit 2 with one line, never a traceback. Usage errors
    (unknown option, missing argument) are click's, which also exit 2."""
    try:
        app()
    except UserError as e:
        for line in e.lines():
            console.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
