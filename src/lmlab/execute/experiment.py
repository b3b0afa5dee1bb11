"""One experiment directory: the plan recorded, the preflight gate, then every run.

``DIR/lmlab.sqlite`` holds the spec as written, the plan, the preflight results and every run's
records. A directory belongs to one design: rerunning the same spec skips completed runs and
resumes interrupted ones; a spec that changes any existing run is refused unless ``force_new``,
which first moves the old directory aside (nothing stored is ever deleted). A spec that only adds
seeds or arms extends the experiment.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from lmlab.data.tokenize import DataBundle, prepare_data
from lmlab.errors import UserError
from lmlab.execute.estimate import check_plan_memory, estimate_plan
from lmlab.execute.lease import hold_directory, move_held_directory
from lmlab.execute.local import run_sweep
from lmlab.execute.pack import PackOption, annotate, auto_note, parse_pack, plan_packs
from lmlab.execute.remote import ExecutorOptions, backend_for, hardware_problem, run_remote
from lmlab.identity import same
from lmlab.names import RESULT_PLAN, RESULT_PREFLIGHT, RESULT_SPEC, STORE_FILE, Event
from lmlab.spec.expand import Plan
from lmlab.store import Store
from lmlab.train.preflight import overfit, preflight_config, preflight_key


def check_hardware(plan: Plan, executor: ExecutorOptions | None = None) -> None:
    """The spec's hardware expectation against this machine, when the runs train here (on a
    cluster each worker checks its own node, and the placement asks for the hardware)."""
    if executor is not None and executor.remote:
        return
    problem = hardware_problem(plan.spec.controlled.hardware)
    if problem is not None:
        raise plan.doc.error("controlled.hardware", problem)


def _archive(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    move_held_directory(out_dir, target)
    return target


def open_experiment(plan: Plan, out_dir: Path, *, force_new: bool = False) -> Path | None:
    """Record the spec and plan in ``out_dir``; refuse to mix two designs. Returns where an
    older experiment was moved to when ``force_new`` had to move one."""
    with hold_directory(out_dir):
        return _open_experiment(plan, out_dir, force_new)


def _open_experiment(plan: Plan, out_dir: Path, force_new: bool) -> Path | None:
    moved = None
    if (out_dir / STORE_FILE).exists():
        with Store.open(out_dir) as store:
            store.check_intact()  # refused now, not by a worker halfway through
            existing = {r["run_id"]: r["config"] for r in store.runs()}
        planned = {r.run_id: r.config for r in plan.runs}
        changed = sorted(rid for rid, cfg in existing.items()
                         if rid not in planned or not same(cfg, planned[rid]))
        if changed and not force_new:
            raise UserError(
                f"{out_dir} holds a different design: runs {', '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''} would change or disappear. Use another "
                "--out, or --force-new to move the old results aside and start fresh",
                file=str(plan.doc.path))
        if changed:
            moved = _archive(out_dir)
    text = plan.doc.path.read_text()
    with Store.open(out_dir) as store:
        store.put_result(RESULT_SPEC, {
            "path": str(plan.doc.path), "text": text,
            "hash": hashlib.sha256(text.encode()).hexdigest()[:16],
            "spec": plan.spec.model_dump(mode="json"),  # resolved: a baseline's tree included
            # The baseline the spec extends, as it was read (path, digest, origin): later
            # reports name it even after the file changes or is gone.
            "baseline": plan.doc.extends.to_json() if plan.doc.extends else None,
        })
        previous = store.get_result(RESULT_PLAN) or {}
        record = plan.to_json()
        estimates = {r["run_id"]: r.get("estimate_s") for r in previous.get("runs", [])}
        # A new seed of a known arm costs what its other seeds cost (the seed changes no shape
        # or kernel): an experiment grown by seeds keeps its estimates; new arms are timed.
        by_arm = {r["arm"]: r["estimate_s"] for r in previous.get("runs", [])
                  if r.get("estimate_s") is not None}
        for r in record["runs"]:
            r["estimate_s"] = estimates.get(r["run_id"]) or by_arm.get(r["arm"])
        known = all(r["estimate_s"] is not None for r in record["runs"])
        record["estimate_total_s"] = sum(r["estimate_s"] for r in record["runs"]) if known else None
        store.put_result(RESULT_PLAN, record)
        for r in plan.runs:
            store.add_run(r.run_id, r.arm, r.seed, r.config.to_json(), r.config.config_hash,
                          role=r.role, point=r.point or None)
    return moved


def prepare_plan_data(plan: Plan) -> DataBundle:
    """Locate, verify and tokenize once, before any worker starts (the controls guarantee one
    dataset and tokenizer per experiment unless they are the independent variable)."""
    cfg = plan.runs[0].config
    return prepare_data(cfg.data, cfg.tokenizer, plan.base)


def estimate(plan: Plan, out_dir: Path | None, data: DataBundle,
             pack: PackOption = "off") -> dict[str, Any]:
    """The plan's record with each run's expected wall-clock, its runs trained as ``pack``
    says (a packed run: its pack's name and its share of the pack's time)."""
    vocab = data.tokenizer.vocab_size
    packs = plan_packs(plan, pack, vocab_size=vocab)
    estimates = estimate_plan(plan, data, [p.runs for p in packs])
    record = annotate(plan.to_json(), packs, estimates, auto_note(plan, pack, vocab))
    for r in record["runs"]:
        r["estimate_s"] = estimates[r["run_id"]]
    record["estimate_total_s"] = sum(estimates.values())
    if out_dir is not None:
        with hold_directory(out_dir), Store.open(out_dir) as store:
            store.put_result(RESULT_PLAN, record)
    return record


def run_preflight(plan: Plan, out_dir: Path, data: DataBundle | None = None) -> dict[str, Any]:
    """The Overfit Sanity Template for each distinct configuration; results go to the store."""
    with hold_directory(out_dir):
        return _run_preflight(plan, out_dir, data)


def _run_preflight(plan: Plan, out_dir: Path, data: DataBundle | None) -> dict[str, Any]:
    pf = plan.spec.preflight
    groups: dict[str, tuple[Any, list[str]]] = {}
    for run in plan.preflight_runs:
        cfg = preflight_config(run.config, pf.lr, pf.seq_len)
        key = preflight_key(cfg)
        if key not in groups:
            groups[key] = (cfg, [])
        if run.arm not in groups[key][1]:
            groups[key][1].append(run.arm)
    configs = []
    for key, (cfg, arms) in groups.items():
        bundle = data if data is not None and _same_data(plan, cfg) else \
            prepare_data(cfg.data, cfg.tokenizer, plan.base)
        result = overfit(cfg, bundle, sequences=pf.sequences, batch_size=pf.batch_size,
                         steps=pf.steps, loss_threshold=pf.loss_threshold, key=key, arms=arms)
        configs.append(result.to_json())
    record = {"passed": all(c["passed"] for c in configs), "configs": configs}
    with Store.open(out_dir) as store:
        store.put_result(RESULT_PREFLIGHT, record)
        store.log_event(None, 0, 0, 0.0, Event.PREFLIGHT,
                        {"passed": record["passed"],
                         "failed_arms": [a for c in configs if not c["passed"] for a in c["arms"]]})
    return record


def _same_data(plan: Plan, cfg: Any) -> bool:
    first = plan.runs[0].config
    return cfg.data == first.data and cfg.tokenizer == first.tokenizer


def run_experiment(plan: Plan, out_dir: Path, *, skip_preflight: bool = False,
                   force_new: bool = False, parallel: int | None = None,
                   pack: PackOption | None = None,
                   executor: ExecutorOptions | None = None) -> dict[str, Any]:
    """The whole experiment, holding ``out_dir``'s lock from the first write to the last (a
    second driver is refused, naming this one). ``pack``: the --pack option (default: the
    spec's ``execution.pack``); ``executor``: where the runs train (default: this machine)."""
    executor = executor or ExecutorOptions()
    check_hardware(plan, executor)
    with hold_directory(out_dir):
        return _run_experiment(plan, out_dir, skip_preflight, force_new, parallel, pack,
                               executor)


def _run_experiment(plan: Plan, out_dir: Path, skip_preflight: bool, force_new: bool,
                    parallel: int | None, pack: PackOption | None,
                    executor: ExecutorOptions) -> dict[str, Any]:
    storage, hardware = executor.storage or out_dir, plan.spec.controlled.hardware
    # The cluster first: one that cannot be reached (or is not there) is refused before anything
    # is written or trained.
    backend = backend_for(executor, storage, hardware) if executor.remote else None
    moved = open_experiment(plan, out_dir, force_new=force_new)
    data = prepare_plan_data(plan)
    if not executor.remote:  # on the device the runs will have, before any is built
        check_plan_memory(plan, data)
    with Store.open(out_dir) as store:
        planned = store.get_result(RESULT_PLAN) or {}
        have_preflight = store.get_result(RESULT_PREFLIGHT)
    option = pack if pack is not None else parse_pack(plan.spec.execution.pack)
    if planned.get("estimate_total_s") is None and not executor.remote:  # timed here: not there
        estimate(plan, out_dir, data, option)
    preflight = have_preflight
    covered = {arm for c in (have_preflight or {}).get("configs", []) for arm in c["arms"]}
    if plan.spec.preflight.enabled and not skip_preflight and (
            have_preflight is None or not have_preflight.get("passed")
            or not set(plan.arms) <= covered):  # new arms bring configurations not yet checked
        preflight = run_preflight(plan, out_dir, data)
        if not preflight["passed"]:
            failed = [f"{', '.join(c['arms'])} (final loss {c['final_loss']:.3g} vs threshold "
                      f"{c['threshold']:g}{', NaN' if c['nan'] else ''})"
                      for c in preflight["configs"] if not c["passed"]]
            raise plan.doc.error("preflight", "preflight failed (Overfit Sanity) for " +
                                 "; ".join(failed) + ": fix the configuration, or rerun with "
                                 "--skip-preflight")
    vocab = data.tokenizer.vocab_size
    units = lambda todo: plan_packs(plan, option, todo, vocab)  # noqa: E731
    if backend is not None:
        results = run_remote(plan.runs, out_dir, backend, storage=storage, units=units,
                             base=plan.base, hardware=hardware)
    else:
        results = run_sweep(plan.runs, out_dir, base=plan.base, parallel=parallel, units=units)
    return {"results": results, "preflight": preflight, "moved": moved}
