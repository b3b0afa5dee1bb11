"""Nuisance variables tuned per arm: the spec and the plan (tuning runs per point and seed,
derived values from the nuisance, the controls), selection, edge extension, the largest stable
value and the LR sensitivity on synthetic objectives with a known optimum per arm, the
power-law fit recovering a known exponent and its interval holding its level over repeated
draws, and a real tiny experiment with an lr grid, killed during tuning and resumed, reported
with confirmation runs only."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmlab import driver
from lmlab.analysis.records import RunRecord
from lmlab.analysis.summary import load_experiment
from lmlab.analysis.tuning import (
    answer,
    extension,
    fit_optimum_scaling,
    sweeps,
)
from lmlab.names import RESULT_TUNING, Role, Status
from lmlab.report.inputs import gather
from lmlab.report.render import render_markdown
from lmlab.report.sections import context
from lmlab.spec.expand import load_plan
from lmlab.spec.schema import Nuisance
from lmlab.store import Store
from test_report import md_table
from test_spec import base_spec, refused, write

# -- synthetic objectives --------------------------------------------------------------------


def objective(opt: float, lr: float, seed: int, noise: float = 0.0) -> float:
    """A loss with its optimum at ``opt``: a parabola in log lr, plus seed noise."""
    rng = np.random.default_rng(abs(hash((round(lr, 12), seed, opt))) % 2**32)
    return 3.0 + 0.2 * (math.log(lr) - math.log(opt)) ** 2 + noise * rng.normal()


def record(arm: str, lr: float, seed: int, loss: float | None, *, status: str = "completed",
           spikes: int = 0) -> RunRecord:
    metrics = {"final_val_loss": loss, "spike_events": float(spikes), "nan_events": 0.0,
               "divergence_events": 0.0}
    return RunRecord(run_id=f"{arm}~{lr:g}-s{seed}", arm=arm, seed=seed, status=status,
                     config={}, provenance={}, summary={}, error=None, curves={}, events=[],
                     metrics=metrics, role=Role.TUNING, point={"optimizer.lr": lr})


def nuisance(values: list[float], extend: int = 0, seeds: tuple[int, ...] = (100,)) -> Nuisance:
    return Nuisance(search={"optimizer.lr": values}, seeds=list(seeds), extend=extend)


def test_selection_recovers_each_arms_optimum_and_extension_walks_past_an_edge():
    grid = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    optima = {"inside": 4.1e-3, "beyond": 5e-2}  # the second lies past the top of the grid
    n = nuisance(grid, extend=3)
    runs = [record(a, lr, 100, objective(o, lr, 100)) for a, o in optima.items() for lr in grid]
    tuning = {"points": {a: n.points() for a in optima}, "extended": dict.fromkeys(optima, 0),
              "selected": None, "extensions": []}
    rounds = 0
    while True:
        judged = sweeps(runs, list(optima), n)
        if not driver.extend_edges(tuning, judged, n.extend):
            break
        rounds += 1
        for arm, points in tuning["points"].items():  # run what was added
            have = {r.point["optimizer.lr"] for r in runs if r.arm == arm}
            for p in points:
                if p["optimizer.lr"] not in have:
                    runs.append(record(arm, p["optimizer.lr"], 100,
                                       objective(optima[arm], p["optimizer.lr"], 100)))
    inside, beyond = judged["inside"], judged["beyond"]
    assert inside.selected.point == {"optimizer.lr": 4e-3} and not inside.edges
    assert inside.extended == 0
    # 1.6e-2 -> 3.2e-2 -> 6.4e-2 -> 1.28e-1: the best is on the top edge until the third
    # extension brackets the optimum 5e-2, and the sweep stops there.
    assert [e["value"] for e in tuning["extensions"]] == [3.2e-2, 6.4e-2, 1.28e-1]
    assert beyond.selected.point == {"optimizer.lr": 6.4e-2} and not beyond.edges
    assert rounds == 3 and beyond.extended == 3


def test_an_edge_that_extend_cannot_leave_is_kept_as_an_edge():
    grid = [1e-3, 2e-3, 4e-3]
    runs = [record("a", lr, 100, objective(1e-4, lr, 100)) for lr in grid]
    judged = sweeps(runs, ["a"], nuisance(grid))["a"]
    assert judged.selected.point == {"optimizer.lr": 1e-3} and judged.edges == {
        "optimizer.lr": "low"}
    tuning = {"points": {"a": []}, "extended": {"a": 0}, "extensions": []}
    assert not driver.extend_edges(tuning, {"a": judged}, 0)  # extend: 0 adds nothing
    assert extension(grid, "low", log=True) == pytest.approx(5e-4)
    assert extension([0, 100, 200], "low", log=False) is None  # no negative warmup
    assert extension([0, 100, 200], "high", log=False, integer=True) == 300


def test_diverged_points_are_never_selected_and_bound_the_largest_stable_value():
    grid = [1e-3, 2e-3, 4e-3, 8e-3]
    runs = [record("a", 1e-3, s, 3.4) for s in (1, 2)]
    runs += [record("a", 2e-3, s, 3.2) for s in (1, 2)]
    runs += [record("a", 4e-3, 1, 3.0, spikes=2), record("a", 4e-3, 2, 3.1)]
    runs += [record("a", 8e-3, 1, None, status=Status.DIVERGED), record("a", 8e-3, 2, 2.0)]
    s = sweeps(runs, ["a"], nuisance(grid, seeds=(1, 2)))["a"]
    assert s.selected.point == {"optimizer.lr": 4e-3}  # 8e-3 diverged once: not selectable
    assert s.largest_stable == 2e-3  # 4e-3 spiked, 8e-3 diverged
    assert [p.score for p in s.ordered()][3] == math.inf
    # Wortsman et al.: capped at the loss at init (here 4.0): mean(3.4, 3.2, 3.05, 4.0) - 3.05
    object.__setattr__(s, "init_loss", 4.0)
    from lmlab.analysis.tuning import lr_sensitivity
    assert lr_sensitivity(s.points, 4.0) == pytest.approx(np.mean([3.4, 3.2, 3.05, 4.0]) - 3.05)
    # An unfinished point: no selection yet.
    pending = [*runs, record("a", 1.6e-2, 1, None, status=Status.RUNNING)]
    assert sweeps(pending, ["a"], nuisance([*grid, 1.6e-2], seeds=(1, 2)))["a"].selected is None


# -- the power law ---------------------------------------------------------------------------

BATCH = np.array([4.0, 8.0, 16.0, 32.0])
LRS = np.exp(np.linspace(math.log(1e-4), math.log(1e-1), 11))


def draw(rng: np.random.Generator, exponent: float, seeds: int, noise: float) -> np.ndarray:
    """(arms, lrs, seeds) losses with optimum lr 1e-3 * (B/4)^exponent, independent noise per
    run and a seed effect shared by every run of a seed."""
    opt = math.log(1e-3) + exponent * np.log(BATCH / 4)
    mean = 3 + 0.3 * (np.log(LRS)[None, :] - opt[:, None]) ** 2
    return (mean[:, :, None] + rng.normal(0, noise, (len(BATCH), len(LRS), seeds))
            + rng.normal(0, noise, (1, 1, seeds)))


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_the_power_law_fit_recovers_a_known_exponent(exponent):
    rng = np.random.default_rng(0)
    exact, _ = fit_optimum_scaling(BATCH, LRS, draw(rng, exponent, 3, 0.0), rng=rng)
    assert exact.exponent == pytest.approx(exponent, abs=1e-6)
    assert exact.y[str(4.0)] == pytest.approx(1e-3, rel=1e-6)
    noisy, _ = fit_optimum_scaling(BATCH, LRS, draw(rng, exponent, 8, 0.02), rng=rng)
    assert noisy.ci[0] < exponent < noisy.ci[1]
    assert noisy.answer == ("square root" if exponent == 0.5 else "proportional")


def test_the_exponent_interval_covers_the_true_value_at_its_nominal_rate():
    """Over repeated synthetic experiments (4 tuning seeds, noise comparable to the seed spread
    of a tiny run), the 90% interval covers the true exponent ~90% of the time: within a
    binomial margin of 300 draws (±2.5 sd), never a silent under-coverage."""
    rng = np.random.default_rng(12)
    draws, level, true = 300, 0.9, 0.5
    hits = 0
    for _ in range(draws):
        law, _ = fit_optimum_scaling(BATCH, LRS, draw(rng, true, 4, 0.05), level=level,
                                     resamples=400, rng=rng)
        hits += law.ci[0] <= true <= law.ci[1]
    margin = 2.5 * math.sqrt(level * (1 - level) / draws)
    assert level - margin <= hits / draws <= level + margin + 0.03, hits / draws


def test_the_largest_stable_lr_gets_its_own_power_law():
    # Runs diverge above a threshold lr that doubles with the batch: exponent 1.
    threshold = 2e-3 * BATCH / 4
    unstable = np.broadcast_to((LRS[None, :] > threshold[:, None])[:, :, None],
                               (len(BATCH), len(LRS), 3))
    losses = np.where(unstable, np.inf, 3.0 + 0.1 * np.arange(len(LRS))[None, :, None])
    _, stable = fit_optimum_scaling(BATCH, LRS, losses, unstable, init_loss=5.0)
    grid_top = np.array([LRS[t >= LRS].max() for t in threshold])
    expected = np.polyfit(np.log(BATCH), np.log(grid_top), 1)[0]
    assert stable.exponent == pytest.approx(expected)


def test_the_answer_reads_the_interval():
    assert answer((0.8, 1.2), 1.0)[0] == "proportional"
    assert answer((0.3, 0.7), 0.5)[0] == "square root"
    assert answer((0.2, 1.3), 0.7)[0] == "inconclusive"
    assert answer((0.6, 0.9), 0.75)[0] == "neither"
    assert answer(None, 0.5)[0] == "inconclusive"
    assert answer((-1.8, 0.52), -0.6)[0] == "inconclusive"  # holds 0.5, but also 0
    assert answer((-0.5, -0.1), -0.3)[0] == "neither"


# -- the spec and the plan ---------------------------------------------------------------------


def tuned_spec(articles_data: dict) -> dict:
    spec = base_spec(articles_data)
    spec["independent"] = {
        "variables": ["train.batch_size"],
        "arms": {"small": {"train.batch_size": 4}, "large": {"train.batch_size": 8}},
        "nuisance": {"search": {"optimizer.lr": {"min": 2e-3, "max": 8e-3, "points": 3,
                                                 "log": True}},
                     "seeds": [100], "extend": 1}}
    spec["hypothesis"]["checks"] = [{"metric": "final_val_loss", "arm": "large", "op": "<",
                                     "than": "small"}]
    spec["budget"] = {"tokens": 8 * 32 * 8}
    spec["evaluation"].update(every_steps=4)
    spec["preflight"] = {"enabled": False}
    return spec


def test_the_plan_is_a_tuning_sweep_per_arm_with_derived_values_from_the_nuisance(
        tmp_path, articles_data):
    spec = tuned_spec(articles_data)
    spec["independent"]["variables"].append("schedule.warmup_steps")
    spec["independent"]["derived"] = {"schedule.warmup_steps": "optimizer.lr * 1000"}
    plan = load_plan(write(tmp_path, spec))
    tuning = [r for r in plan.runs if r.tuning]
    assert [r.run_id for r in tuning if r.arm == "small"] == [
        "small~lr=0.002-s100", "small~lr=0.004-s100", "small~lr=0.008-s100"]
    assert {r.config.schedule.warmup_steps for r in tuning} == {2, 4, 8}
    assert {r.config.train.seed for r in tuning} == {100}
    assert plan.confirmation_runs == []  # planned once tuning has selected
    assert [r.point for r in plan.preflight_runs] == [{"optimizer.lr": 0.004}] * 2
    selected = driver.stand_in(plan)
    assert {r.run_id for r in selected.confirmation_runs} == {
        "small-s0", "small-s1", "large-s0", "large-s1"}
    assert plan_of_tuning(plan)["extension_runs_worst_case"] == 2


def plan_of_tuning(plan):
    return driver.plan_tuning(plan)


@pytest.mark.parametrize(("change", "field", "says"), [
    (lambda s: s["independent"]["nuisance"].update(seeds=[0]), "independent.nuisance.seeds",
     "also confirmation seeds"),
    (lambda s: s["independent"]["arms"]["small"].update({"optimizer.lr": 1e-3}),
     "independent.nuisance.search.optimizer.lr", "no arm sets it"),
    (lambda s: s["independent"]["nuisance"].update(select="test_loss"),
     "independent.nuisance.select", ""),
    (lambda s: s["independent"]["nuisance"]["search"].update({"optimizer.weight_decay":
                                                              [0.0, 0.1]}),
     "independent.nuisance", "one searched variable"),
    (lambda s: s["controlled"]["model"].update(d_model=48) or s["independent"]["arms"][
        "large"].update({"model.d_model": 64}), "independent.arms.large",
     "not declared independent"),
])
def test_nuisance_mistakes_are_refused_with_their_field(tmp_path, articles_data, change, field,
                                                        says):
    spec = tuned_spec(articles_data)
    change(spec)
    err = refused(tmp_path, spec)
    assert field in (err.field or "") and says in err.message


# -- a real tiny experiment ------------------------------------------------------------------


def _wait_for_tuning(out, deadline: float) -> None:
    """Until the first sweep has finished some runs and another is mid-way."""
    while time.time() < deadline:
        if (out / "lmlab.sqlite").exists():
            with Store.open(out) as store:
                states = [r["status"] for r in store.runs()]
            if states.count("completed") >= 2 and "running" in states:
                return
        time.sleep(0.05)
    raise AssertionError("tuning never got going")


def test_a_tuned_experiment_resumes_after_a_kill_during_tuning_and_reports_per_arm(
        tmp_path, articles_data):
    spec = tuned_spec(articles_data)
    path = write(tmp_path, spec)
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "lmlab.cli", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_for_tuning(out, time.time() + 300)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the middle of the tuning sweep
        proc.wait(timeout=120)
    assert proc.returncode != 0
    with Store.open(out) as store:
        tuning = store.get_result(RESULT_TUNING)
        roles = {r["role"] for r in store.runs()}
    assert tuning["selected"] is None and roles == {Role.TUNING}

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(out) as store:
        tuning = store.get_result(RESULT_TUNING)
        runs = store.runs()
        steps = {r["run_id"]: [row.step for row in store.metrics(r["run_id"], ["train_loss"])
                               ["train_loss"]] for r in runs}
    assert {r["status"] for r in runs} == {"completed"}
    assert all(s == sorted(set(s)) and s[-1] in (8, 16) for s in steps.values())  # none twice
    confirm = [r for r in runs if r["role"] == Role.CONFIRMATION]
    assert {r["run_id"] for r in confirm} == {"small-s0", "small-s1", "large-s0", "large-s1"}
    for r in confirm:  # each arm's confirmation runs at its own selected lr
        assert r["config"]["optimizer"]["lr"] == tuning["selected"][r["arm"]]["optimizer.lr"]
    points = {a: [p["optimizer.lr"] for p in pts] for a, pts in tuning["points"].items()}
    for arm, ext in tuning["extended"].items():  # an edge got its one extension
        assert len(points[arm]) == 3 + ext

    exp = load_experiment(out)
    assert len(exp.runs) == 4 and len(exp.tuning) == len(runs) - 4  # never mixed
    md = render_markdown(context(gather(exp)), out)
    tuned = md.split("### Nuisance Tuning (per arm)")[1].split("## 9.")[0]
    rows = {r["Arm"]: r for r in md_table(tuned, "Arm")}
    for arm in ("small", "large"):
        assert rows[arm]["Selected"] == f"lr = {tuning['selected'][arm]['optimizer.lr']:g}"
        assert rows[arm]["Largest stable optimizer.lr"] != ""
        assert float(rows[arm]["LR sensitivity"]) >= 0
    edge = [a for a in ("small", "large") if rows[a]["Edge"] != "inside the range"]
    assert all(f"WARNING: {a}'s selected optimizer.lr" in tuned for a in edge)
    section9 = md.split("## 9. Interpretation")[1].split("## 10.")[0]
    check = md_table(section9, "Check")[0]
    assert "(2 seed pairs" in check["Analysis"]  # confirmation seeds 0 and 1 only
    assert "Does increasing batch size allow a proportionally larger stable learning rate?" \
        in section9
    section10 = md.split("## 10. Decision")[1]
    assert "**Selected LR:** tuned per arm — small: optimizer.lr = " in section10

    status = subprocess.run([sys.executable, "-m", "lmlab.cli", "status", str(out), "--json"],
                            capture_output=True, text=True)
    import json
    rows_json = json.loads(status.stdout)
    assert {r["role"] for r in rows_json} == {"tuning", "confirmation"}


def test_until_settled_rounds_add_confirmation_seeds_after_tuning(tmp_path, articles_data):
    spec = tuned_spec(articles_data)
    spec["independent"]["nuisance"]["seeds"] = [2]
    spec["analysis"] = {"until_settled": True, "max_seeds": 3, "seeds_per_round": 1}
    plan = load_plan(write(tmp_path, spec))
    design = driver.design_of(plan)
    assert [list(r) for r in design.rounds] == [[0, 1], [3]]  # seed 2 is a tuning seed
    rounds = driver.plan_rounds(plan, design)
    assert rounds[1]["runs"] == ["small-s3", "large-s3"]  # confirmation runs only
    assert all("~" not in rid for r in rounds for rid in r["runs"])
