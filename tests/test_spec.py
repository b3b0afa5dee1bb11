"""The experiment spec: schema errors with file:line, the frozen-control check, coupled
variables, budgets by comparison axis, the preflight gate and resumable sweeps."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmlab.errors import UserError
from lmlab.execute.experiment import run_experiment, run_preflight
from lmlab.names import RUN_METRICS
from lmlab.spec.expand import load_plan
from lmlab.spec.schema import Spec
from lmlab.store import Store


def base_spec(articles_data: dict) -> dict:
    return {
        "meta": {"name": "t", "category": "hyperparam", "seeds": [0, 1]},
        "objective": "Does a higher lr lower the loss?",
        "hypothesis": {"mechanism": "bigger steps", "prediction": "lower loss",
                       "falsification": "same or higher loss",
                       "checks": [{"metric": "final_val_loss", "arm": "fast", "op": "<",
                                   "than": "slow"}]},
        "controlled": {
            "data": articles_data,
            "tokenizer": {"kind": "bpe", "vocab_size": 512},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
            "optimizer": {"lr": 1e-3},
            "train": {"batch_size": 8, "seq_len": 32},
        },
        "independent": {"variables": ["optimizer.lr"],
                        "arms": {"slow": {"optimizer.lr": 1e-3}, "fast": {"optimizer.lr": 3e-3}}},
        "budget": {"tokens": 8 * 32 * 12},
        "comparison_axis": "equal_tokens",
        "evaluation": {"every_steps": 6, "max_batches": 4, "test_at_end": False,
                       "diagnostics": {"every_steps": 6}},
        "cadence": {"log_every_steps": 3, "checkpoint_every_steps": 4},
        "expected_outcomes": ["fast ends lower"],
        "preflight": {"sequences": 2, "batch_size": 2, "steps": 60, "loss_threshold": 1.5},
    }


def write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def refused(tmp_path: Path, spec: dict | str) -> UserError:
    path = tmp_path / "bad.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UserError) as info:
        load_plan(path)
    return info.value


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# ---- controls -------------------------------------------------------------------------------

def test_undeclared_difference_between_arms_is_refused(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["independent"]["arms"]["fast"]["model.dropout"] = 0.1
    err = refused(tmp_path, spec)
    assert "model.dropout" in err.message and "not declared independent" in err.message
    assert "slow: 0.0" in err.message and "fast: 0.1" in err.message
    assert err.file.endswith("bad.yaml") and err.line == line_of(tmp_path / "bad.yaml", "fast:")


def test_coupled_variables_must_be_declared_together(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["independent"] = {"variables": ["train.batch_size"],
                           "arms": {"small": {"train.batch_size": 8},
                                    "big": {"train.batch_size": 16, "optimizer.lr": 2e-3}}}
    spec["hypothesis"]["checks"] = []
    err = refused(tmp_path, spec)
    assert "optimizer.lr" in err.message and "coupled" in err.message


def test_derived_values_expand_per_arm(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["independent"] = {"grid": {"train.batch_size": [8, 16, 32]},
                           "derived": {"optimizer.lr": "1e-3 * sqrt(train.batch_size / 8)",
                                       "train.grad_accum": "train.batch_size / 8"}}
    spec["hypothesis"]["checks"] = []
    spec["budget"] = {"tokens": 32 * 32 * 3}
    plan = load_plan(write(tmp_path, spec))
    assert sorted(plan.arms) == ["batch_size=16", "batch_size=32", "batch_size=8"]
    assert set(plan.variables) == {"train.batch_size", "optimizer.lr", "train.grad_accum"}
    for run in plan.runs:
        b = run.config.train.batch_size
        assert run.config.optimizer.lr == pytest.approx(1e-3 * (b / 8) ** 0.5)
        assert run.config.train.grad_accum == b // 8 and run.config.train.micro_batch_size == 8
        assert run.values["optimizer.lr"] == run.config.optimizer.lr
    assert len(plan.runs) == 3 * 2 and {r.seed for r in plan.runs} == {0, 1}
    # everything not declared stays identical
    frozen = {json.dumps([r.config.model.model_dump(), r.config.data.model_dump(),
                          r.config.schedule.model_dump(), r.config.train.seq_len]) for r in plan.runs}
    assert len(frozen) == 1


def test_zip_and_derived_errors(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["independent"] = {"zip": {"train.batch_size": [8, 16], "optimizer.lr": [1e-3]}}
    assert "equal lengths" in refused(tmp_path, spec).message
    spec["independent"] = {"grid": {"train.batch_size": [8, 16]},
                           "derived": {"optimizer.lr": "__import__('os').getcwd()"}}
    err = refused(tmp_path, spec)
    assert err.field == "independent.derived.optimizer.lr" and "not allowed" in err.message
    spec["independent"] = {"grid": {"train.batch_size": [8, 16]},
                           "derived": {"optimizer.lr": "1e-3 * train.batchsize"}}
    assert "unknown variable" in refused(tmp_path, spec).message
    spec["independent"] = {"grid": {"train.batch_size": [8, 16]},
                           "derived": {"train.grad_accum": "optimizer.lr * 3000"}}
    err = refused(tmp_path, spec)  # a derived value that breaks the config: file:line, not a crash
    assert err.field == "independent.derived.train.grad_accum" and "got 3" in err.message
    spec["independent"] = {"grid": {"budget.tokens": [8, 16]}}
    assert "cannot be an independent variable" in refused(tmp_path, spec).message
    spec["independent"] = {"grid": {"train.seed": [1, 2]}}
    assert "meta.seeds" in refused(tmp_path, spec).message


# ---- budgets by comparison axis ------------------------------------------------------------------

def _two_batch_sizes(articles_data: dict) -> dict:
    spec = base_spec(articles_data)
    spec["independent"] = {"variables": ["train.batch_size"],
                           "arms": {"slow": {"train.batch_size": 8}, "fast": {"train.batch_size": 16}}}
    return spec


def test_equal_tokens_derives_steps_per_arm(tmp_path, articles_data):
    spec = _two_batch_sizes(articles_data)
    spec["budget"] = {"tokens": 16 * 32 * 6}
    plan = load_plan(write(tmp_path, spec))
    steps = {r.arm: r.config.budget.steps for r in plan.runs}
    assert steps == {"slow": 12, "fast": 6}
    assert {r.config.budget.tokens for r in plan.runs} == {16 * 32 * 6}
    spec["budget"] = {"tokens": 16 * 32 * 6 + 8 * 32}  # whole steps for slow, not for fast
    err = refused(tmp_path, spec)
    assert "fast" in err.message and "not a whole number of steps" in err.message
    assert err.field == "budget.tokens"
    spec["budget"] = {"tokens": 16 * 32 * 6, "steps": 10}
    assert refused(tmp_path, spec).field == "budget.steps"


def test_equal_steps_and_equal_wall_clock(tmp_path, articles_data):
    spec = _two_batch_sizes(articles_data)
    spec["comparison_axis"] = "equal_steps"
    spec["budget"] = {"steps": 7}
    plan = load_plan(write(tmp_path, spec))
    assert {r.arm: (r.config.budget.steps, r.config.budget.tokens) for r in plan.runs} == \
        {"slow": (7, 7 * 8 * 32), "fast": (7, 7 * 16 * 32)}
    spec["comparison_axis"] = "equal_wall_clock"
    err = refused(tmp_path, spec)
    assert err.field == "budget.wall_clock_s"
    spec["budget"] = {"wall_clock_s": 20, "steps": 5}
    err = refused(tmp_path, spec)
    assert err.field == "budget.steps" and "equal_wall_clock" in err.message
    spec["budget"] = {"wall_clock_s": 20}
    spec["evaluation"]["every_steps"] = None
    plan = load_plan(write(tmp_path, spec))
    for r in plan.runs:
        assert r.config.budget.wall_clock_s == 20 and r.config.budget.steps is None
        assert r.config.evaluation.every_seconds == 2.0  # the same wall-clock points for every arm
    spec["evaluation"]["every_steps"] = 5
    assert "every_seconds" in refused(tmp_path, spec).message


def test_equal_tokens_is_honoured_by_real_runs(tmp_path, articles_data):
    spec = _two_batch_sizes(articles_data)
    spec["meta"]["seeds"] = [0]
    spec["budget"] = {"tokens": 16 * 32 * 4}
    spec["hypothesis"]["checks"] = []
    out = tmp_path / "exp"
    result = run_experiment(load_plan(write(tmp_path, spec)), out, skip_preflight=True)
    assert set(result["results"].values()) == {"completed"}
    with Store.open(out) as store:
        seen = {r["arm"]: (r["summary"]["tokens"], r["summary"]["steps"]) for r in store.runs()}
    assert seen == {"slow": (2048, 8), "fast": (2048, 4)}


# ---- schema errors: exit 2 with file:line ------------------------------------------------------

@pytest.mark.parametrize("mutate, field, needle", [
    (lambda s: s["controlled"]["model"].update(n_layer="many"), "controlled.model.n_layer", "n_layer:"),
    (lambda s: s["controlled"]["optimizer"].update(lrr=1.0), "controlled.optimizer.lrr", "lrr:"),
    (lambda s: s.pop("objective"), "objective", None),
    (lambda s: s.update(comparison_axis="equal_vibes"), "comparison_axis", "comparison_axis:"),
    (lambda s: s["independent"]["arms"]["fast"].update({"optimizer.lr": "fast"}),
     "independent.arms.fast.optimizer.lr", "optimizer.lr: fast"),
    (lambda s: s["meta"].update(category="vibes"), "meta.category", "category:"),
])
def test_bad_specs_name_file_line_and_field(tmp_path, articles_data, mutate, field, needle):
    spec = base_spec(articles_data)
    mutate(spec)
    err = refused(tmp_path, spec)
    assert err.field == field, (err.field, err.message)
    path = tmp_path / "bad.yaml"
    assert err.file == str(path)
    if needle:
        assert err.line == line_of(path, needle)


def test_yaml_syntax_error_and_cli_exit_code(tmp_path, articles_data):
    text = yaml.safe_dump(base_spec(articles_data), sort_keys=False).replace(
        "objective:", "objective: [unclosed\n  more:", 1)
    err = refused(tmp_path, text)
    assert "YAML syntax error" in err.message and err.line is not None
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "validate", str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and f"{tmp_path / 'bad.yaml'}:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("category", ["hyperparam", "optimizer", "memory", "architecture",
                                      "recipe"])
def test_new_writes_a_valid_spec_with_every_section(tmp_path, monkeypatch, category):
    monkeypatch.chdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "new", "my-exp", "--category",
                           category], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "my-exp.yaml").read_text()
    for section in Spec.model_fields:  # the template writes every section the schema has
        assert f"\n{section}:" in text or f"\n# {section}:" in text, section
    for metric in RUN_METRICS:  # and names every metric a check may use
        assert metric in text, metric
    for heading in ("# 0. Experiment Meta", "# 1. Objective", "# 2. Hypothesis", "# 3. Controlled",
                    "# 4. Independent", "# 5. Experimental Design", "# 7. Expected Outcomes",
                    "Overfit Sanity"):
        assert heading in text
    plan = load_plan(tmp_path / "my-exp.yaml")
    assert plan.spec.meta.category == category and plan.spec.meta.name == "my-exp"
    assert f"# Example ({category}):" in text
    again = subprocess.run([sys.executable, "-m", "lmlab.cli", "new", "my-exp"], capture_output=True, text=True)
    assert again.returncode == 2  # never overwrites without --force


def test_each_category_asks_a_question_of_its_kind(tmp_path):
    """`new --category C` wrote the same warmup arms for every C: each now varies what its
    kind of experiment varies, with checks on those arms."""
    from lmlab.spec.expand import addendum_requested
    from lmlab.spec.template import CATEGORIES, render

    plans = {}
    for category in CATEGORIES:
        path = tmp_path / f"{category}.yaml"
        path.write_text(render(category, category))
        plans[category] = load_plan(path)
    varied = {c: set(p.variables) for c, p in plans.items()}
    assert {"train.batch_size", "optimizer.lr"} <= varied["hyperparam"]
    assert varied["optimizer"] == {"optimizer.name"}
    optimizer = plans["optimizer"]
    assert len({optimizer.arm_config(a).optimizer.name for a in optimizer.arms}) == 2
    assert all(v.startswith("model.") for v in varied["architecture"])
    assert varied["memory"] == {"train.activation_checkpointing"}
    assert addendum_requested(plans["memory"].spec)
    assert not any(addendum_requested(p.spec) for c, p in plans.items() if c != "memory")
    assert varied["recipe"] <= {"schedule.warmup_steps", "schedule.name", "train.z_loss"}
    assert "peak_mem_bytes" in {c.metric for c in plans["memory"].spec.hypothesis.checks}
    # five different designs, each with checks on its own arms
    assert len({tuple(sorted(p.arms)) for p in plans.values()}) == len(CATEGORIES)
    for p in plans.values():
        assert p.spec.hypothesis.checks
        for check in p.spec.hypothesis.checks:
            assert check.arm in p.arms and (check.than is None or check.than in p.arms)


def test_every_error_is_shown_each_with_its_line_up_to_a_cap(tmp_path, articles_data):
    from lmlab.spec.load import MAX_ERRORS

    spec = base_spec(articles_data)
    spec["hypotesis"] = spec.pop("hypothesis")
    err = refused(tmp_path, spec)
    path = tmp_path / "bad.yaml"
    assert [e.field for e in [err, *err.more]] == ["hypothesis", "hypotesis"]
    assert err.more[0].line == line_of(path, "hypotesis:")
    assert "did you mean 'hypothesis'" in err.more[0].message
    assert err.omitted == 0 and len(err.lines()) == 2

    spec = base_spec(articles_data)
    spec["controlled"]["model"].update({f"knob_{i}": i for i in range(MAX_ERRORS + 8)})
    err = refused(tmp_path, spec)
    lines = err.lines()
    assert len(lines) == MAX_ERRORS + 1 and err.omitted == 8
    assert lines[-1] == "... and 8 more errors (fix these first)"
    assert [e.line for e in [err, *err.more]] == sorted(e.line for e in [err, *err.more])
    assert lines[0].startswith(f"{path}:{line_of(path, 'knob_0:')} controlled.model.knob_0: ")


# ---- preflight ---------------------------------------------------------------------------------

def test_preflight_passes_healthy_and_fails_broken(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["independent"]["arms"] = {"slow": {"optimizer.lr": 0.0}, "fast": {"optimizer.lr": 3e-3}}
    spec["hypothesis"]["checks"] = []
    plan = load_plan(write(tmp_path, spec))
    record = run_preflight(plan, tmp_path / "exp")
    by_arm = {c["arms"][0]: c for c in record["configs"]}
    assert by_arm["fast"]["passed"] and by_arm["fast"]["final_loss"] < 1.5
    assert not by_arm["slow"]["passed"] and by_arm["slow"]["final_loss"] == pytest.approx(
        by_arm["slow"]["initial_loss"])
    assert not record["passed"] and not by_arm["fast"]["nan"] and by_arm["fast"]["grads_finite"]
    with Store.open(tmp_path / "exp") as store:
        assert store.get_result("experiment/preflight")["passed"] is False
    with pytest.raises(UserError, match="preflight failed"):
        run_experiment(plan, tmp_path / "exp")
    with Store.open(tmp_path / "exp") as store:
        assert all(r["status"] == "pending" for r in store.runs())  # the sweep never started


# ---- sweeps: resume, refuse mixing designs ------------------------------------------------------

def _metric_values(out: Path) -> dict:
    timing = {"step_time_s", "tokens_per_s", "peak_mem_bytes"}
    with Store.open(out) as store:
        return {r["run_id"]: {n: [(m.step, m.value) for m in rows]
                              for n, rows in store.metrics(r["run_id"]).items() if n not in timing}
                for r in store.runs()}


def test_interrupted_sweep_resumes_to_the_uninterrupted_result(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["budget"] = {"tokens": 8 * 32 * 300}
    spec["evaluation"].update(every_steps=100)
    spec["cadence"].update(checkpoint_every_steps=20)
    path = write(tmp_path, spec)
    cmd = [sys.executable, "-m", "lmlab.cli", "run", str(path), "--skip-preflight"]
    subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True, capture_output=True)
    reference = _metric_values(tmp_path / "ref")

    out = tmp_path / "exp"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until the second run (slow-s1) is well under way
        if (out / "lmlab.sqlite").exists():
            with Store.open(out) as store:
                second = store.metrics("slow-s1", ["train_loss"]).get("train_loss", []) \
                    if store.run("slow-s1") else []
            if len(second) >= 20:
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    proc.wait(timeout=120)
    assert proc.returncode != 0
    with Store.open(out) as store:
        states = {r["run_id"]: r["status"] for r in store.runs()}
    assert "interrupted" in states.values() and "pending" in states.values(), states
    interrupted = [rid for rid, state in states.items() if state == "interrupted"]

    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(out) as store:
        assert {r["status"] for r in store.runs()} == {"completed"}
        for run_id in interrupted:  # it went on from its checkpoint, not from scratch
            assert any(e["kind"] == "resume" for e in store.events(run_id))
    assert _metric_values(out) == reference


def test_changed_spec_is_refused_unless_force_new(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["meta"]["seeds"] = [0]
    spec["budget"] = {"tokens": 8 * 32 * 2}
    out = tmp_path / "exp"
    run_experiment(load_plan(write(tmp_path, spec)), out, skip_preflight=True)
    changed = copy.deepcopy(spec)
    changed["controlled"]["model"]["d_model"] = 64
    with pytest.raises(UserError, match="different design"):
        run_experiment(load_plan(write(tmp_path, changed)), out, skip_preflight=True)
    grown = copy.deepcopy(spec)
    grown["meta"]["seeds"] = [0, 1]  # more seeds of the same design extend the experiment
    run_experiment(load_plan(write(tmp_path, grown)), out, skip_preflight=True)
    with Store.open(out) as store:
        assert len(store.runs()) == 4
    moved = run_experiment(load_plan(write(tmp_path, changed)), out, skip_preflight=True,
                           force_new=True)["moved"]
    assert moved is not None and (moved / "lmlab.sqlite").exists()  # old results kept, aside
    with Store.open(moved) as old:
        assert len(old.runs()) == 4


def test_plan_json_lists_runs(tmp_path, articles_data):
    path = write(tmp_path, base_spec(articles_data))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "plan", str(path), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert [r["run_id"] for r in record["runs"]] == ["slow-s0", "slow-s1", "fast-s0", "fast-s1"]
    assert all(r["estimate_s"] > 0 for r in record["runs"])
    assert record["estimate_total_s"] == pytest.approx(sum(r["estimate_s"] for r in record["runs"]))
