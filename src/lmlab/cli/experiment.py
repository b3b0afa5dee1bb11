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
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", min=1, help="train over N devices of this node with torchrun "
        "(DDP; sets train.distributed.nproc, so it is part of the run's config)")] = None,
) -> None:
    """Train one configuration and record everything about it in DIR/lmlab.sqlite."""
    from pydantic import ValidationError

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
    if nproc_per_node is not None:
        tree = cfg.model_dump(mode="json")
        tree["train"]["distributed"]["nproc"] = nproc_per_node
        try:
            cfg = RunConfig.model_validate(tree)
        except ValidationError as e:  # the global batch cannot be shared by the ranks
            raise UserError(e.errors()[0]["msg"].removeprefix("Value error, "),
                            field="--nproc-per-node") from None
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
    n = len(plan.spec.meta.seeds)
    tuning = len(plan.runs) - len(plan.confirmation_runs)
    runs = (f"{tuning} tuning runs, then {len(plan.arms)} arms × {n} seeds = "
            f"{len(plan.arms) * n} confirmation runs at each arm's selected value"
            if plan.nuisance else f"{len(plan.arms)} arms × {n} seeds = {len(plan.runs)} runs")
    out.print(f"{spec}: valid — {runs}, axis {plan.spec.comparison_axis}, "
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
    from lmlab.driver import design_of, plan_rounds, plan_tuning, stand_in
    from lmlab.execute.experiment import estimate, prepare_plan_data
    from lmlab.execute.pack import annotate, auto_note, parse_pack, plan_packs

    p = plan_of(spec, data_dir, fallback_corpus)
    warn(p, bound=no_estimate)  # a measured estimate says more than the bound
    option = parse_pack(pack if pack is not None else p.spec.execution.pack)
    design = design_of(p, until_settled, max_seeds)
    # Every run the rounds may add is timed and listed; a tuned experiment's confirmation runs
    # at a stand-in value (the selection is made from the tuning runs).
    p = stand_in(p, sorted(design.seeds_through(len(design.rounds))) if design else None)
    if no_estimate:
        record = annotate(p.to_json(), plan_packs(p, option), note=auto_note(p, option))
    else:
        with console.status("timing a few real steps of each shape..."), p.doc.located("controlled"):
            record = estimate(p, None, prepare_plan_data(p), option)
    if p.nuisance is not None and not p.selected:  # the stand-in values are not the plan's
        tuned = {k for r in p.runs if r.tuning for k, v in r.values.items()
                 if v != p.arms[r.arm].get(k, v) or k in p.nuisance.search}
        for r in record["runs"]:
            if r["role"] != "tuning":
                r["values"] = {**r["values"], **dict.fromkeys(tuned, "selected")}
    estimates = {r["run_id"]: r.get("estimate_s") for r in record["runs"]}
    if design is not None:
        record["rounds"] = plan_rounds(p, design, estimates)
        record["sequential"] = design.to_json()
    if p.nuisance is not None:
        record["tuning"] = plan_tuning(p, None if no_estimate else estimates)
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
    if (t := record.get("tuning")) is not None:
        extra = t["extension_s_worst_case"]
        out.print(f"tuning: {t['first_sweep_runs']} runs ({len(p.arms)} arms x {t['points']} "
                  f"points x {len(t['tuning_seeds'])} seeds), selected by {t['select']}; "
                  f"then {t['confirmation_runs']} confirmation runs at each arm's selected "
                  "value (timed at the middle of the search)")
        if t["extend"]:
            out.print(f"edge extensions: up to {t['extension_runs_worst_case']} more tuning "
                      f"runs ({t['extend']} per arm x the tuning seeds)" +
                      (f", {seconds(extra)} in the worst case" if extra is not None else ""))
    if design is not None:
        from lmlab.report.terminal import rounds_table

        table, footer = rounds_table(record["rounds"], design)
        out.print(table)
        out.print(footer)
    elif (total := record.get("estimate_total_s")) is not None:
        from lmlab.execute.feasible import DAY_S

        packed = any(r.get("pack") for r in record["runs"])
        extra = (record.get("tuning") or {}).get("extension_s_worst_case")
        out.print(f"expected wall-clock in total: {seconds(total)} (runs"
                  + (" and packs" if packed else "") + " in sequence on this machine"
                  + ("; a packed run's figure is its share of its pack's)" if packed else ")")
                  + (f"; {seconds(total + extra)} if every arm is extended" if extra else ""))
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
    executor: Annotated[str | None, typer.Option(
        "--executor", help="where the runs train: local (this machine), ray (one Ray task per "
        "run or pack), slurm (one submitit job each); default execution.executor. See "
        "docs/cluster.md")] = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); "
        "default: start one here")] = None,
    storage: Annotated[Path | None, typer.Option(
        "--storage", help="ray/slurm: a directory every node reaches, for checkpoints and the "
        "rows on their way to the driver (default: the experiment directory)")] = None,
    cpus_per_run: Annotated[float | None, typer.Option(
        "--cpus-per-run", min=0.01, help="ray/slurm: CPUs per run or pack")] = None,
    gpus_per_run: Annotated[float | None, typer.Option(
        "--gpus-per-run", min=0, help="ray/slurm: GPUs per run or pack (default: 1 when "
        "controlled.hardware is a GPU)")] = None,
    partition: Annotated[str | None, typer.Option(
        "--partition", help="slurm: the partition")] = None,
    time_min: Annotated[int | None, typer.Option(
        "--time-min", min=1, help="slurm: each job's time limit in minutes")] = None,
) -> None:
    """Preflight, then every arm x seed, each in its own process. Rerun to resume.

    On a cluster: --executor ray or slurm."""
    from lmlab import driver
    from lmlab.execute.pack import parse_pack
    from lmlab.execute.remote import executor_options
    from lmlab.names import STORE_FILE, Status

    option = parse_pack(pack) if pack is not None else None

    p = plan_of(spec, data_dir, fallback_corpus)
    warn(p)
    out_dir = out_dir or Path("runs") / p.spec.meta.name
    where = executor_options(p.spec.execution, kind=executor, address=address, storage=storage,
                             cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                             partition=partition, time_min=time_min)
    with p.doc.located("controlled"):
        result = driver.run(p, out_dir, until_settled=until_settled, max_seeds=max_seeds,
                            skip_preflight=skip_preflight, force_new=force_new,
                            parallel=parallel, pack=option, executor=where)
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
