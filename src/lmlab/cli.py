"""The ``lmlab`` command line (typer + rich).

Every error a user can cause ends as one line ``file:line field: message`` on stderr and exit
code 2; bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmlab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Controlled language-model training experiments on WikiText-2.")
console = Console(stderr=True)
out = Console()


def _fmt(value: object, digits: int = 4) -> str:
    """A number as the report writes it (lmlab.report.format); anything else as it is."""
    from lmlab.report.format import sig

    return sig(value, digits) if value is None or isinstance(value, float) else str(value)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="a run config YAML (sections data, tokenizer, "
                                                "model, optimizer, schedule, train, budget, "
                                                "evaluation, cadence)")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="output directory "
                                                 "(default runs/<config name>)")] = None,
) -> None:
    """Train one configuration and record everything about it in DIR/lmlab.sqlite."""
    from lmlab.analysis.records import load_runs
    from lmlab.config import RunConfig
    from lmlab.execute.local import run_single
    from lmlab.identity import run_id
    from lmlab.names import STORE_FILE, Status
    from lmlab.spec.load import load_yaml, upgrade_run_doc, validate
    from lmlab.store import Store

    doc = upgrade_run_doc(load_yaml(config))
    cfg = validate(doc, RunConfig)
    out_dir = out_dir or Path("runs") / config.stem
    with doc.located():
        result = run_single(cfg, out_dir, run_id=run_id(config.stem, cfg.train.seed),
                            base=config.parent.resolve())
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
    from lmlab.report.format import NA, integer, mib
    from lmlab.store import Store

    with Store.existing(directory) as store:
        rows = [status_row(r) for r in load_runs(store)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=str(directory))
    for col in ("run", "status", "steps", "tokens", "val loss", "val ppl", "bpb", "word ppl",
                "tok/s", "peak memory", "events"):
        table.add_column(col)
    for r in rows:
        events = ", ".join(f"{k}:{v}" for k, v in sorted(r["events"].items())) or NA
        # A run that did not complete has no final metrics: say where it stopped instead.
        stopped = f" at step {r['stopped_at_step']:,}" if r["stopped_at_step"] is not None else ""
        table.add_row(r["run_id"], r["status"] + stopped, integer(r["steps"]),
                      integer(r["tokens"]), _fmt(r["final_val_loss"]), _fmt(r["final_val_ppl"]),
                      _fmt(r["final_val_bpb"]), _fmt(r["final_val_word_ppl"]),
                      integer(r["tokens_per_s"]), mib(r["peak_mem_bytes"]), events)
    out.print(table)


PACK_HELP = ("auto | off | N: train runs of one shape (seeds, arms that only change numbers) "
             "together as one stacked model, each with its own record (default: the spec's "
             "execution.pack, off)")


def _plan(spec: Path):
    from lmlab.spec.expand import load_plan

    return load_plan(spec)


def _placeholders(spec: Path) -> list[str]:
    import re

    return sorted(set(re.findall(r"__[A-Z]+__", spec.read_text())))


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="experiment name; writes NAME.yaml")],
    category: Annotated[str, typer.Option(help="hyperparam | optimizer | memory | "
                                          "architecture | recipe")] = "hyperparam",
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a new spec: every template section present, with the template's comments."""
    from lmlab.spec.schema import Meta
    from lmlab.spec.template import render

    path = Path(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    stem = path.stem
    try:
        Meta(name=stem, category=category)  # type: ignore[arg-type]
    except Exception:
        raise UserError(f"category must be one of hyperparam, optimizer, memory, architecture, "
                        f"recipe (got {category!r}) and the name letters, digits, _ . -",
                        field="--category") from None
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
    if todo := _placeholders(spec):
        console.print(f"[yellow]note:[/] unfilled placeholders: {', '.join(todo)}")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    no_estimate: Annotated[bool, typer.Option("--no-estimate", help="skip timing real steps")] = False,
    pack: Annotated[str | None, typer.Option("--pack", help=PACK_HELP)] = None,
) -> None:
    """The table of runs and their expected wall-clock (timed on a few real steps per shape),
    and the packs they train in."""
    from lmlab.execute.experiment import estimate, prepare_plan_data
    from lmlab.execute.pack import annotate, parse_pack, plan_packs

    p = _plan(spec)
    option = parse_pack(pack) if pack is not None else parse_pack(p.spec.execution.pack)
    if no_estimate:
        record = annotate(p.to_json(), plan_packs(p, option))
    else:
        with console.status("timing a few real steps of each shape..."), p.doc.located("controlled"):
            record = estimate(p, None, prepare_plan_data(p), option)
    packed = any(r.get("pack") for r in record["runs"])
    if as_json:
        out.print_json(json.dumps(record))
        return
    table = Table(title=f"{p.spec.meta.name}: {len(p.runs)} runs, {p.spec.comparison_axis}")
    for col in ("run", "arm", "seed", *p.variables, "tokens", "steps", "eff. batch",
                *(["pack"] if packed else []), "expected"):
        table.add_column(col)
    for r in record["runs"]:
        est = r.get("estimate_s")
        table.add_row(r["run_id"], r["arm"], str(r["seed"]),
                      *[_fmt(r["values"].get(v, "")) for v in p.variables],
                      _fmt(r["tokens"]), _fmt(r["steps"]), str(r["effective_batch"]),
                      *([r.get("pack") or "-"] if packed else []),
                      f"{est:.0f} s" if est is not None else "-")
    out.print(table)
    for unit in record.get("packs", []):
        est = unit["estimate_s"]
        out.print(f"pack {unit['name']}: {len(unit['runs'])} runs as one stacked model "
                  f"({', '.join(unit['runs'])})" + (f", expected {est:.0f} s" if est else ""))
    if record.get("estimate_total_s") is not None:
        out.print(f"expected wall-clock in total: {record['estimate_total_s'] / 60:.1f} min "
                  "(runs and packs in sequence on this machine; a packed run's figure is its "
                  "share of its pack's)" if packed else
                  f"expected wall-clock in total: {record['estimate_total_s'] / 60:.1f} min "
                  "(runs in sequence on this machine)")


@app.command()
def preflight(
    spec: Annotated[Path, typer.Argument(help="an experiment spec YAML")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="experiment directory "
                                                 "(default runs/<name>)")] = None,
) -> None:
    """The Overfit Sanity Template for each distinct configuration; Pass/Fail in the store."""
    from lmlab.execute.experiment import open_experiment, run_preflight

    p = _plan(spec)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
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
    skip_preflight: Annotated[bool, typer.Option("--skip-preflight")] = False,
    force_new: Annotated[bool, typer.Option("--force-new", help="the spec changed: move the "
                                            "old results aside and start a new experiment")] = False,
    parallel: Annotated[int | None, typer.Option(min=1, help="concurrent runs (default: one "
                                                 "per GPU, or one on CPU)")] = None,
    pack: Annotated[str | None, typer.Option("--pack", help=PACK_HELP)] = None,
    fallback_corpus: Annotated[Path | None, typer.Option(
        "--fallback-corpus", help="if WikiText-2 cannot be found or downloaded, train on this "
        "local corpus folder instead (recorded and reported under its own name)")] = None,
) -> None:
    """Preflight, then every arm x seed, each in its own process. Rerun to resume."""
    from lmlab.execute.experiment import run_experiment
    from lmlab.execute.pack import parse_pack
    from lmlab.names import STORE_FILE, Status

    option = parse_pack(pack) if pack is not None else None
    p = _plan(spec)
    if fallback_corpus is not None:
        p = _with_fallback(p, fallback_corpus)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    with p.doc.located("controlled"):
        result = run_experiment(p, out_dir, skip_preflight=skip_preflight, force_new=force_new,
                                parallel=parallel, pack=option)
    if result["moved"]:
        console.print(f"previous results moved to {result['moved']}")
    counts: dict[str, int] = {}
    for state in result["results"].values():
        counts[state] = counts.get(state, 0) + 1
    out.print(f"{p.spec.meta.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    out.print(f"results: {out_dir / STORE_FILE}   next: lmlab report {out_dir}")
    if any(counts.get(s) for s in (Status.INTERRUPTED, Status.FAILED, Status.PENDING)):
        raise typer.Exit(1)


def _with_fallback(p, corpus: Path):
    """Swap WikiText-2 for a local corpus when WikiText-2 is not available on this machine."""
    from lmlab.data.wikitext import locate_corpus
    from lmlab.spec.expand import expand

    data = p.spec.controlled.data
    if data.dataset != "wikitext-2-raw-v1":
        return p
    try:
        locate_corpus(data, p.base)
        return p
    except UserError as e:
        console.print(f"[yellow]WikiText-2 is not available here[/] ({str(e).splitlines()[0][:160]})"
                      f"\n[yellow]training on the local corpus {corpus} instead; every record "
                      "and the report name it as what it is, not WikiText-2[/]")
    if not corpus.is_dir():
        raise UserError("fallback corpus folder not found", file=str(corpus),
                        field="--fallback-corpus")
    spec = p.spec.model_copy(deep=True)
    spec.controlled.data = type(data)(dataset="local", path=str(corpus.resolve()))
    return expand(spec, p.doc)


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
    """The Memory / Systems addendum: step time, tokens/sec, peak memory and final val loss per
    arm against the reference, with memory saved, speed change and behaviour difference
    (computed from the store, for any experiment with runs)."""
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


def main() -> None:
    """Console entry point: user errors exit 2 with one line, never a traceback. Usage errors
    (unknown option, missing argument) are click's, which also exit 2."""
    try:
        app()
    except UserError as e:
        console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
