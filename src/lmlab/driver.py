"""Runs an experiment's rounds through :mod:`lmlab.execute`, judging with :mod:`lmlab.analysis`
between them: ``lmlab run SPEC --until-settled``.

A fixed design is one round: the declared seeds. An until-settled design (``analysis.
until_settled`` or ``--until-settled``) fixes, before anything runs, the rounds of seeds every
arm will get (the declared ones, then ``seeds_per_round`` more per round up to ``max_seeds``);
after each round it looks at the data with the group-sequential levels of
:mod:`lmlab.analysis.sequential` and stops as soon as every check is supported or refuted, or
when the cap is reached. Each round is recorded in the store before it runs and each look after
it is judged (``RESULT_SEQUENTIAL``: the design, the rounds started, every look with its
boundaries and decisions, and where it stopped), so a killed experiment resumes mid-round
(``lmlab run`` again: completed runs are skipped, interrupted ones resume from their
checkpoints) and the report shows every look.

The design cannot change once the first round has started: the boundaries depend on the cap,
and changing it after a look would let the data choose the test.

With nuisance variables (``independent.nuisance``) the experiment has a tuning phase first:
every arm's sweep (its points x the tuning seeds), judged by :mod:`lmlab.analysis.tuning` once
it has ended; an arm whose best value sits on an edge of the search gets one point beyond it
(up to ``extend``), and the sweep runs again, until no arm needs one. Then each arm's selected
point is fixed and its confirmation runs (every seed, or round after round) run at it. Each
extension and the selection are recorded before what depends on them runs
(``RESULT_TUNING``), so a kill anywhere resumes where it stopped, and a selection once made is
never re-chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.analysis.checks import is_test
from lmlab.analysis.records import load_runs
from lmlab.analysis.sequential import Design, Level
from lmlab.analysis.summary import load_experiment, summarize_arms
from lmlab.analysis.tuning import ArmSweep, extension, sweeps
from lmlab.analysis.verdict import HypothesisVerdict, judge_experiment
from lmlab.errors import UserError
from lmlab.execute.experiment import check_hardware, open_experiment, run_experiment
from lmlab.execute.pack import PackOption
from lmlab.execute.remote import ExecutorOptions
from lmlab.names import FINISHED, RESULT_SEQUENTIAL, RESULT_TUNING, STORE_FILE, Role
from lmlab.spec.expand import Plan, check_until_settled, expand, seed_rounds, spec_checks
from lmlab.spec.nuisance import Point, initial_points, middle_point
from lmlab.store import Store


@dataclass(frozen=True)
class Outcome:
    """What ``run`` did: every run's final status, the preflight record, where an older
    experiment was moved to, and for an until-settled design its record and last verdict."""

    results: dict[str, str]
    preflight: dict[str, Any] | None
    moved: Path | None
    sequential: dict[str, Any] | None = None
    verdict: HypothesisVerdict | None = None

    @property
    def unfinished(self) -> bool:
        return any(s not in FINISHED for s in self.results.values())


def design_of(plan: Plan, until_settled: bool | None = None,
              max_seeds: int | None = None) -> Design | None:
    """The until-settled design the spec (or the command line's overrides) asks for; None for
    a fixed design."""
    spec = plan.spec
    a = spec.analysis
    if not (a.until_settled if until_settled is None else until_settled):
        return None
    cap = max_seeds if max_seeds is not None else a.max_seeds
    if max_seeds is not None:
        try:
            check_until_settled(spec, plan.doc, cap, "analysis.max_seeds")
        except UserError as e:  # the number came from the command line, not the spec
            raise UserError(e.message.replace("max_seeds", "--max-seeds"),
                            field="--max-seeds") from None
    else:
        check_until_settled(spec, plan.doc, cap, "analysis.max_seeds")
    assert cap is not None
    rounds = seed_rounds(spec, cap, a.seeds_per_round)
    return Design(tuple(tuple(r) for r in rounds), a.alpha)


def run(plan: Plan, out_dir: Path, *, until_settled: bool | None = None,
        max_seeds: int | None = None, skip_preflight: bool = False, force_new: bool = False,
        parallel: int | None = None, pack: PackOption | None = None,
        executor: ExecutorOptions | None = None) -> Outcome:
    """Run the experiment in ``out_dir``: its declared seeds, or round after round until
    settled. Rerun to resume; a design already started continues as recorded. ``pack``: the
    --pack option (default: the spec's ``execution.pack``); ``executor``: where the runs train."""
    asked = design_of(plan, until_settled, max_seeds)
    if plan.nuisance is not None:
        tuned = tune(plan, out_dir, skip_preflight=skip_preflight, force_new=force_new,
                     parallel=parallel, pack=pack, executor=executor)
        if isinstance(tuned, Outcome):  # interrupted or failed during tuning
            return tuned
        plan, force_new = tuned, False  # the tuning runs are this experiment's now
    stored = None if force_new else _stored(out_dir)
    if stored is not None:
        design = Design.from_json(stored["design"])
        if asked is not None and asked != design:
            raise UserError(
                f"{out_dir} is an until-settled experiment whose design was fixed before its "
                f"first look (rounds {_rounds_text(design)}, α = {design.alpha:g}); this run asks "
                f"for rounds {_rounds_text(asked)}, α = {asked.alpha:g}. Changing the design "
                "after a look would let the data choose the test: keep it, or use another "
                "--out (or --force-new to move these results aside)", file=str(plan.doc.path))
        record = stored
    elif asked is not None:
        design = asked
        record = {"design": design.to_json(), "rounds_started": 1, "looks": [], "stopped": None}
    else:
        done = run_experiment(plan, out_dir, skip_preflight=skip_preflight, force_new=force_new,
                              parallel=parallel, pack=pack, executor=executor)
        return Outcome(done["results"], done["preflight"], done["moved"])

    grow = asked is not None
    moved, verdict = None, None
    while True:
        look = int(record["rounds_started"])
        seeds = sorted(design.seeds_through(look))
        round_plan = expand(plan.spec, plan.doc, seeds=seeds, tuning=plan.tuning or None,
                            selected=plan.selected or None)
        check_hardware(round_plan, executor)
        moved = moved or open_experiment(round_plan, out_dir, force_new=force_new)
        force_new = False  # the old results are aside; the next rounds extend this experiment
        _put(out_dir, record)  # the round is on record before any of its runs starts
        done = run_experiment(round_plan, out_dir, skip_preflight=skip_preflight,
                              parallel=parallel, pack=pack, executor=executor)
        outcome = Outcome(done["results"], done["preflight"], moved, record)
        if outcome.unfinished:  # interrupted or failed: judge nothing until the round is whole
            return outcome
        exp = load_experiment(out_dir)
        verdict = judge_experiment(exp, summarize_arms(exp), looks=look)
        record["looks"] = [*record["looks"][:look - 1], _look_record(verdict, look, seeds)]
        open_ = _open_claims(verdict)
        if not open_:
            record["stopped"] = {"look": look, "reason": "every check is supported or refuted"}
        elif look >= len(design.rounds):
            record["stopped"] = {"look": look, "reason": (
                f"the cap of {design.max_seeds} seeds per arm was reached with "
                f"{len(open_)} check{'s' if len(open_) != 1 else ''} still inconclusive")}
        if record["stopped"] is not None or not grow:
            _put(out_dir, record)
            return Outcome(done["results"], done["preflight"], moved, record, verdict)
        record["rounds_started"] = look + 1
        _put(out_dir, record)


def plan_rounds(plan: Plan, design: Design,
                estimates: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """What an until-settled experiment may run, round by round: its seeds, its runs, their
    expected seconds (from ``estimates`` by run id) and the running total (the last one is the
    worst case), and the p-value a check must reach at each look (planned information, each of
    the spec's tests at its first Holm share: the boundaries loosen as checks settle)."""
    tests = sum(is_test(c) for _, c in spec_checks(plan.spec)) or 1
    share = design.alpha / tests
    full = stand_in(plan, sorted(design.seeds_through(len(design.rounds))))
    out, total, fractions = [], 0.0, []
    for k, seeds in enumerate(design.rounds, 1):
        runs = [r for r in full.confirmation_runs if r.seed in seeds]
        known = [estimates.get(r.run_id) for r in runs] if estimates else []
        expected = sum(e for e in known if e is not None) if known and None not in known else None
        total = total + expected if expected is not None else total
        fractions.append(design.fraction(len(design.seeds_through(k)), k))
        out.append({"round": k, "seeds": list(seeds), "runs": [r.run_id for r in runs],
                    "seeds_per_arm": len(design.seeds_through(k)),
                    "expected_s": expected, "cumulative_s": total if expected is not None else None,
                    "boundary_p": Level(share, tuple(fractions)).two_sided})
    return out


# -- the tuning phase ----------------------------------------------------------------------------


def tune(plan: Plan, out_dir: Path, *, skip_preflight: bool = False, force_new: bool = False,
         parallel: int | None = None, pack: PackOption | None = None,
         executor: ExecutorOptions | None = None) -> Plan | Outcome:
    """Run every arm's nuisance sweep to its selection: the plan with each arm's selected point
    (its confirmation runs planned), or the Outcome of a sweep that did not finish."""
    nuisance = plan.nuisance
    assert nuisance is not None
    record = None if force_new else _stored_tuning(out_dir)
    first = initial_points(nuisance)
    if record is not None and any(pts[:len(first)] != first for pts in record["points"].values()):
        raise UserError(f"{out_dir} holds a tuning sweep over other values than the spec's "
                        "independent.nuisance.search: keep the search, or use another --out "
                        "(or --force-new to move these results aside)", file=str(plan.doc.path))
    if record is None:
        record = {"points": {}, "extended": {}, "selected": None, "extensions": []}
    for arm in plan.arms:  # an arm added to the spec since is tuned on its own
        record["points"].setdefault(arm, first)
        record["extended"].setdefault(arm, 0)
    selected: dict[str, Point] = dict(record["selected"] or {})
    moved = None
    while open_ := [a for a in plan.arms if a not in selected]:
        sweep_plan = expand(plan.spec, plan.doc, tuning=record["points"],
                            selected={a: p for a, p in selected.items() if a in plan.arms})
        check_hardware(sweep_plan, executor)
        moved = moved or open_experiment(sweep_plan, out_dir, force_new=force_new)
        force_new = False
        _put(out_dir, record, RESULT_TUNING)  # each extension is on record before its runs start
        done = run_experiment(sweep_plan, out_dir, skip_preflight=skip_preflight,
                              parallel=parallel, pack=pack, executor=executor)
        outcome = Outcome(done["results"], done["preflight"], moved)
        if outcome.unfinished:
            return outcome
        with Store.open(out_dir) as store:
            judged = sweeps(load_runs(store, Role.TUNING), open_, nuisance)
        if not extend_edges(record, judged, nuisance.extend):
            selected |= _selection(judged, plan)  # once chosen, never chosen again
            record["selected"] = selected
            _put(out_dir, record, RESULT_TUNING)
    return expand(plan.spec, plan.doc, tuning=record["points"],
                  selected={a: dict(selected[a]) for a in plan.arms})


def extend_edges(record: dict[str, Any], judged: dict[str, ArmSweep], limit: int) -> bool:
    """One point beyond the edge for every arm whose best value is on one (while it has
    extensions left), added to the tuning ``record``; whether any was."""
    grown = False
    for arm, s in judged.items():
        if not s.edges or record["extended"][arm] >= limit:
            continue
        path = s.path
        values = [float(p.point[path]) for p in s.points]
        integer = all(isinstance(p.point[path], int) for p in s.points)
        new = extension(values, s.edges[path], s.log[path], integer)
        if new is None:
            continue
        value: float | int = int(new) if integer else new
        record["points"][arm] = [*record["points"][arm], {path: value}]
        record["extended"][arm] += 1
        record["extensions"].append({"arm": arm, "edge": s.edges[path], "path": path,
                                     "value": value, "best_was": s.selected.point[path]
                                     if s.selected else None})
        grown = True
    return grown


def _selection(judged: dict[str, ArmSweep], plan: Plan) -> dict[str, Point]:
    out = {}
    for arm, s in judged.items():
        if s.selected is None:
            raise plan.doc.error("independent.nuisance.search", f"arm {arm}: no tuning point "
                                 "ended with a finite selection metric (every one diverged): "
                                 "search smaller values; the tuning runs stay stored")
        out[arm] = dict(s.selected.point)
    return out


def plan_tuning(plan: Plan, estimates: dict[str, float | None] | None = None) -> dict[str, Any]:
    """What the tuning phase may run: the first sweep's runs and the extensions' worst case
    (every arm extended ``extend`` times, each point x the tuning seeds), with their expected
    seconds from ``estimates`` (by run id; an extension point costs what the arm's other
    tuning runs cost: the nuisance values change no step's cost)."""
    nuisance = plan.nuisance
    assert nuisance is not None
    tuning = [r for r in plan.runs if r.tuning]
    per_arm: dict[str, list[float]] = {}
    for r in tuning:
        e = (estimates or {}).get(r.run_id)
        if e is not None:
            per_arm.setdefault(r.arm, []).append(e)
    extra = nuisance.extend * len(nuisance.seeds)
    known = estimates is not None and all(a in per_arm for a in plan.arms)
    extra_s = sum(extra * sum(v) / len(v) for v in per_arm.values()) if known else None
    return {"first_sweep_runs": len(tuning), "points": len(initial_points(nuisance)),
            "tuning_seeds": list(nuisance.seeds), "select": nuisance.select,
            "extend": nuisance.extend, "extension_runs_worst_case": extra * len(plan.arms),
            "extension_s_worst_case": extra_s,
            "confirmation_runs": len(plan.confirmation_runs)}


def stand_in(plan: Plan, seeds: list[int] | None = None) -> Plan:
    """The plan of ``seeds`` (default: its own) with, where tuning has not selected yet, every
    arm's confirmation runs at a stand-in point (the middle of the first search): what ``lmlab
    plan`` times, since the nuisance values change no step's cost."""
    if plan.nuisance is None:
        return plan if seeds is None else expand(plan.spec, plan.doc, seeds=seeds)
    selected = plan.selected or dict.fromkeys(plan.arms, middle_point(plan.nuisance))
    return expand(plan.spec, plan.doc, seeds=seeds, tuning=plan.tuning or None,
                  selected=selected)


def _stored_tuning(out_dir: Path) -> dict[str, Any] | None:
    if not (out_dir / STORE_FILE).exists():
        return None
    with Store.open(out_dir) as store:
        return store.get_result(RESULT_TUNING)


# -- the record --------------------------------------------------------------------------------


def _stored(out_dir: Path) -> dict[str, Any] | None:
    if not (out_dir / STORE_FILE).exists():
        return None
    with Store.open(out_dir) as store:
        return store.get_result(RESULT_SEQUENTIAL)


def _put(out_dir: Path, record: dict[str, Any], key: str = RESULT_SEQUENTIAL) -> None:
    """Put the driver's record (the sequential design and its looks, or the tuning record)
    on record in the store, whole."""
    with Store.open(out_dir) as store:
        store.put_result(key, record)


def _open_claims(verdict: HypothesisVerdict) -> list[str]:
    results = [*verdict.checks, *(r for _, r in verdict.outcomes if r is not None)]
    return [r.description for r in results if not r.settled]


def _look_record(verdict: HypothesisVerdict, look: int, seeds: list[int]) -> dict[str, Any]:
    """One look as the store keeps it: what each check's test gave, the boundary it had to
    reach, and the decision."""
    results = [*verdict.checks, *(r for _, r in verdict.outcomes if r is not None)]
    return {"look": look, "seeds": seeds, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "verdict": verdict.overall, "settled": not _open_claims(verdict),
            "checks": [{"check": r.description, "verdict": r.verdict, "p": r.p,
                        "boundary_p": r.threshold, "decided_at_look": r.look,
                        "n_arm": r.n_arm, "n_ref": r.n_ref} for r in results]}


def _rounds_text(design: Design) -> str:
    return " | ".join(",".join(map(str, r)) for r in design.rounds)
