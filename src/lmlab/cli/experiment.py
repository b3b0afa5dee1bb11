"""The commands that define and run experiments: `lmlab train`, `new`, `validate`, `plan`,
`preflight` and `run`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmlab.cli import (
    PACK_HELP,
    DataDir,
    FallbackCorpus,
    app,
    console,
    fallback_data,
    fmt_cell,
    out,
    plan_of,
    show_baseline,
    use_data_dir,
    warn,
)
from lmlab.errors import UserError


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

    use_data_dir(data_dir)
    doc = upgrade_run_doc(load_yaml(config))
    cfg = validate(doc, RunConfig)
    base = config.parent.resolve()
    if fallback_corpus is not None:
        with doc.located():
            data = fallback_data(cfg.data, base, fallback_corpus)
        cfg = cfg.model_copy(update={"data": data})
    out_dir = out_dir or Path("runs") / config.stem
    with doc.located():
        result = run_single(cfg, out_dir, run_id=run_id(config.stem, cfg.train.seed), base=base)
    with Store.existing(out_dir) as store:
        record = next(r for r in load_runs(store) if r.run_id == result.run_id)
    out.print(f"[bold]{result.run_id}[/]: {result.status}")
    for key in ("final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
                "tokens_per_s", "peak_mem_bytes"):
        out.print(f"  {key}: {fmt_cell(record.metrics.get(key))}")
    out.print(f"results: {out_dir / STORE_FILE}   (lmlab status {out_dir})")
    if result.status != Status.COMPLETED:
        raise typer.Exit(1)


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
    plan = plan_of(spec)
    out.print(f"{spec}: valid — {len(plan.arms)} arms × {len(plan.spec.meta.seeds)} seeds = "
              f"{len(plan.runs)} runs, axis {plan.spec.comparison_axis}, "
              f"independent: {', '.join(plan.variables)}")
    show_baseline(plan)
    warn(plan)
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
    pack: Annotated[str | None, typer.Option("--pack", help=PACK_HELP)] = None,
) -> None:
    """The runs, their packs and their expected wall-clock.

    Each shape is timed on a few real steps; until settled, the rounds and the worst case."""
    from lmlab.driver import design_of, plan_rounds
    from lmlab.execute.experiment import estimate, prepare_plan_data
    from lmlab.execute.pack import annotate, parse_pack, plan_packs
    from lmlab.spec.expand import expand

    p = plan_of(spec, data_dir, fallback_corpus)
    warn(p, bound=no_estimate)  # a measured estimate says more than the bound
    option = parse_pack(pack if pack is not None else p.spec.execution.pack)
    design = design_of(p, until_settled, max_seeds)
    if design is not None:  # every run the rounds may add is timed and listed
        p = expand(p.spec, p.doc, seeds=sorted(design.seeds_through(len(design.rounds))))
    if no_estimate:
        record = annotate(p.to_json(), plan_packs(p, option))
    else:
        with console.status("timing a few real steps of each shape..."), p.doc.located("controlled"):
            record = estimate(p, None, prepare_plan_data(p), option)
    if design is not None:
        estimates = {r["run_id"]: r.get("estimate_s") for r in record["runs"]}
        record["rounds"] = plan_rounds(p, design, estimates)
        record["sequential"] = design.to_json()
    if as_json:
        if p.doc.extends is not None:
            record["baseline"] = p.doc.extends.to_json()
        out.print_json(json.dumps(record))
        return
    show_baseline(p)
    from lmlab.report.format import seconds
    from lmlab.report.terminal import pack_lines, plan_table

    table, dropped = plan_table(record, p.variables, out.width, title=f"{p.spec.meta.name}: "
                                f"{len(p.runs)} runs, {p.spec.comparison_axis}")
    out.print(table)
    if dropped:
        console.print(f"(too narrow for {', '.join(dropped)}: widen the terminal, or --json)")
    for line in pack_lines(record):
        out.print(line)
    if design is not None:
        from lmlab.report.terminal import rounds_table

        table, footer = rounds_table(record["rounds"], design)
        out.print(table)
        out.print(footer)
    elif (total := record.get("estimate_total_s")) is not None:
        from lmlab.execute.feasible import DAY_S

        packed = any(r.get("pack") for r in record["runs"])
        out.print(f"expected wall-clock in total: {seconds(total)} (runs"
                  + (" and packs" if packed else "") + " in sequence on this machine"
                  + ("; a packed run's figure is its share of its pack's)" if packed else ")"))
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

    p = plan_of(spec, data_dir, fallback_corpus)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    with hold_directory(out_dir):  # one driver writes the directory at a time
        open_experiment(p, out_dir)
        with console.status("preflight: overfitting a tiny slice..."), p.doc.located("controlled"):
            record = run_preflight(p, out_dir)
    table = Table(title="Overfit Sanity (preflight)")
    for col in ("arms", "steps", "initial loss", "final loss", "threshold", "NaN", "grads finite", "result"):
        table.add_column(col)
    for c in record["configs"]:
        table.add_row(", ".join(c["arms"]), str(c["steps"]), fmt_cell(c["initial_loss"]),
                      fmt_cell(c["final_loss"]), fmt_cell(c["threshold"]), str(c["nan"]),
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
    pack: Annotated[str | None, typer.Option("--pack", help=PACK_HELP)] = None,
) -> None:
    """Preflight, then every arm x seed, each in its own process. Rerun to resume."""
    from lmlab import driver
    from lmlab.execute.pack import parse_pack
    from lmlab.names import STORE_FILE, Status

    option = parse_pack(pack) if pack is not None else None

    p = plan_of(spec, data_dir, fallback_corpus)
    warn(p)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    with p.doc.located("controlled"):
        result = driver.run(p, out_dir, until_settled=until_settled, max_seeds=max_seeds,
                            skip_preflight=skip_preflight, force_new=force_new,
                            parallel=parallel, pack=option)
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
