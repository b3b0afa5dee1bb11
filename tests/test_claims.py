"""What a spec may claim and how each claim is read: the seed policy's parts (in every run's
config, and in what the run trains), curve-statistic windows (spec errors with file:line),
expected outcomes that carry a check, the until-settled settings, and the pairing decision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmlab.analysis.curvestats import arm_values, run_value
from lmlab.analysis.records import RunRecord
from lmlab.analysis.summary import Experiment
from lmlab.analysis.verdict import pairing
from lmlab.config import RunConfig
from lmlab.names import RUN_METRICS
from lmlab.spec.expand import load_plan, seed_rounds
from lmlab.spec.schema import CurveStat, Spec
from lmlab.store import MetricRow, Store
from lmlab.train.loop import train
from test_spec import base_spec, line_of, refused, write

GRAD_WINDOW = {"metric": "grad_norm", "reduce": "max", "tokens": [0, 8 * 32 * 4]}


def _curve_check(**curve: object) -> dict:
    return {"curve": {**GRAD_WINDOW, **curve}, "arm": "fast", "op": ">", "than": "slow"}


# ---- the seed policy's parts ------------------------------------------------------------------


def test_seed_policy_sets_each_part_in_every_runs_config(tmp_path, articles_data):
    spec = base_spec(articles_data)
    plan = load_plan(write(tmp_path, spec))  # the default: every part per seed, shared by arms
    assert {(r.config.train.init_seed, r.config.train.data_seed) for r in plan.runs} == \
        {(None, None)}
    assert {r.config.train.init_seed_used for r in plan.runs if r.seed == 1} == {1}

    spec["controlled"]["seed_policy"] = {"data_order": 7}  # PolyPythia: fixed data order
    plan = load_plan(write(tmp_path, spec))
    assert {r.config.train.data_seed for r in plan.runs} == {7}
    assert {r.seed: r.config.train.init_seed_used for r in plan.runs} == {0: 0, 1: 1}

    spec["controlled"]["seed_policy"] = {"streams": "per_arm"}  # arms draw their own numbers
    plan = load_plan(write(tmp_path, spec))
    parts = {(r.arm, r.seed): (r.config.train.init_seed, r.config.train.data_seed)
             for r in plan.runs}
    assert len(set(parts.values())) == 4 and None not in {p for v in parts.values() for p in v}
    assert load_plan(write(tmp_path, spec)).runs[0].config == plan.runs[0].config  # stable

    # lmlab 0.2 wrote the one policy it had as a name.
    spec["controlled"]["seed_policy"] = "same_seeds_all_arms"
    assert load_plan(write(tmp_path, spec)).spec.controlled.seed_policy.shares_random_numbers


def test_fixing_every_part_of_the_seed_is_refused(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["controlled"]["seed_policy"] = {"init": 0, "data_order": 0}
    err = refused(tmp_path, spec)
    assert err.field == "controlled.seed_policy" and "same random numbers" in err.message
    assert err.line == line_of(tmp_path / "bad.yaml", "seed_policy:")


def test_the_run_trains_with_each_part_of_its_seed(tmp_path, articles_data):
    """init_seed fixes the weights (the step-0 validation loss), data_seed the batches (the
    first step's train loss, from the same weights)."""
    base = {"data": articles_data, "tokenizer": {"kind": "bpe", "vocab_size": 512},
            "model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "budget": {"steps": 2},
            "train": {"batch_size": 4, "seq_len": 32},
            "evaluation": {"every_steps": 100, "max_batches": 2, "test_at_end": False}}

    def first(name: str, **train_fields: int) -> tuple[float, float]:
        cfg = RunConfig.model_validate({**base, "train": {**base["train"], **train_fields}})
        with Store.open(tmp_path / name) as store:
            store.add_run(name, "a", cfg.train.seed, cfg.to_json(), cfg.config_hash)
            train(cfg, name, store, tmp_path / name / "run")
            m = store.metrics(name)
        return m["val_loss"][0].value, m["train_loss"][0].value

    seed0 = first("s0", seed=0)
    data_only = first("d", seed=1, init_seed=0)  # seed 0's weights, seed 1's data order
    init_only = first("i", seed=1, data_seed=0)  # seed 1's weights, seed 0's data order
    assert data_only[0] == seed0[0] and data_only[1] != seed0[1]
    assert init_only[0] != seed0[0]
    assert first("s0-again", seed=0, init_seed=0, data_seed=0) == seed0


# ---- curve statistics -------------------------------------------------------------------------


def test_curve_windows_are_checked_against_the_design(tmp_path, articles_data):
    spec = base_spec(articles_data)  # equal_tokens, 12 steps of 8 x 32 tokens
    spec["hypothesis"]["checks"] = [_curve_check()]
    assert load_plan(write(tmp_path, spec)).spec.hypothesis.checks[0].curve.unit == "tokens"

    cases = [
        ({"tokens": None, "steps": [0, 4]}, "curve.steps",
         "every arm takes 256 tokens per step, so write tokens: [0, 1024]"),
        ({"tokens": [500, 100]}, "curve.tokens", "the window is empty"),
        ({"tokens": [0, 99_999]}, "curve.tokens", "after the budget's 3,072"),
        ({"tokens": ["10%", "abc"]}, "curve.tokens", "a number or a percentage"),
        ({"metric": "grad_nrom"}, "curve", "unknown curve 'grad_nrom'"),
        ({"metric": "spike", "reduce": "max"}, "curve", "it is counted (reduce: count)"),
        ({"reduce": "first_below"}, "curve", "first_below needs a threshold"),
        ({"metric": "val_loss", "reduce": "mean", "tokens": [300, 600]}, "curve.tokens",
         "holds no evaluation of val_loss (every 1,536 tokens)"),
    ]
    for change, field, message in cases:
        curve = {k: v for k, v in {**GRAD_WINDOW, **change}.items() if v is not None}
        spec["hypothesis"]["checks"] = [{**_curve_check(), "curve": curve}]
        spec["evaluation"]["every_tokens"], spec["evaluation"]["every_steps"] = 1536, None
        err = refused(tmp_path, spec)
        assert err.field.startswith(f"hypothesis.checks.0.{field}"), (change, err)
        assert message in err.message, (change, err.message)
        assert err.line is not None and err.file.endswith("bad.yaml")
    # The same check as an expected outcome is validated the same way, at its own line.
    spec["hypothesis"]["checks"] = []
    spec["expected_outcomes"] = ["prose stays prose", {"outcome": "fast ramps harder", "check": {
        **_curve_check(), "curve": {**GRAD_WINDOW, "tokens": [0, 10**6]}}}]
    err = refused(tmp_path, spec)
    assert err.field == "expected_outcomes.1.check.curve.tokens"
    assert err.line == line_of(tmp_path / "bad.yaml", "tokens:") or err.line > 1
    spec["expected_outcomes"][1]["check"] = {"metric": "final_val_loss", "arm": "nope", "op": "<",
                                             "than": "slow"}
    assert refused(tmp_path, spec).field == "expected_outcomes.1.check.arm"


def _run(seed: int, status: str = "completed", *, grads: list[float],
         val: list[float] | None = None, spikes: tuple[int, ...] = ()) -> RunRecord:
    """Steps of 100 tokens and 1 s; grads[i] is step i + 1's gradient norm."""
    curves = {"grad_norm": [MetricRow(i + 1, 100 * (i + 1), float(i + 1), g)
                            for i, g in enumerate(grads)]}
    if val is not None:
        curves["val_loss"] = [MetricRow(5 * i, 500 * i, 5.0 * i, v) for i, v in enumerate(val)]
    events = [{"kind": "spike", "step": s, "tokens": 100 * s, "wall_s": float(s), "detail": {}}
              for s in spikes]
    run = RunRecord(f"a-s{seed}", "a", seed, status, {"budget": {"tokens": 100 * len(grads)}},
                    {}, {}, None, curves, events)
    run.metrics = dict.fromkeys(RUN_METRICS)
    return run


def test_curve_statistics_read_the_window_on_the_axis() -> None:
    run = _run(0, grads=[5.0, 9.0, 2.0, 1.0, 1.0, 7.0, 1.0, 1.0, 1.0, 3.0],
               val=[9.0, 6.0, 4.5], spikes=(2, 6, 9))
    stat = CurveStat.model_validate
    assert run_value(run, stat({"metric": "grad_norm", "reduce": "max", "tokens": [0, 400]}),
                     "tokens") == 9.0
    assert run_value(run, stat({"metric": "grad_norm", "reduce": "mean",
                                "tokens": ["90%", "100%"]}), "tokens") == 3.0  # the last step
    assert run_value(run, stat({"metric": "grad_norm", "reduce": "last", "steps": [0, 5]}),
                     "step") == 1.0
    assert run_value(run, stat({"metric": "spike", "reduce": "count", "steps": [0, 6]}),
                     "step") == 2.0
    reach = stat({"metric": "val_loss", "reduce": "first_below", "threshold": 5.0})
    assert run_value(run, reach, "tokens") == 1000.0  # the tokens to reach a val loss of 5
    assert run_value(run, stat({"metric": "val_loss", "reduce": "first_below",
                                "threshold": 1.0}), "tokens") is None  # never reached

    early = stat({"metric": "grad_norm", "reduce": "max", "tokens": [0, 300]})
    runs = [run, _run(1, "diverged", grads=[4.0, 4.0, 8.0, math.inf]),  # ran through the window
            _run(2, "diverged", grads=[4.0]),  # stopped inside it: not measured
            _run(3, "failed", grads=[1.0, 1.0, 1.0, 1.0])]
    assert arm_values(runs, early, "tokens") == [(0, 9.0), (1, 8.0)]


# ---- until settled, and the pairing decision ------------------------------------------------------


def test_until_settled_needs_a_cap_above_the_declared_seeds(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["analysis"] = {"until_settled": True}
    err = refused(tmp_path, spec)
    assert err.field == "analysis.max_seeds" and "needs max_seeds" in err.message
    spec["analysis"]["max_seeds"] = 2
    assert "leaves no room" in refused(tmp_path, spec).message
    spec["analysis"]["max_seeds"] = 7
    plan = load_plan(write(tmp_path, spec))
    assert seed_rounds(plan.spec, 7) == [[0, 1], [2, 3], [4, 5], [6]]
    assert seed_rounds(plan.spec, 5, per_round=1) == [[0, 1], [2], [3], [4]]


def _experiment(spec: Spec, seeds: dict[str, list[int]]) -> Experiment:
    plan = {"runs": [{"arm": arm, "seed": s} for arm, ss in seeds.items() for s in ss]}
    return Experiment(Path("."), "x", spec, None, plan, None, [], list(seeds), "slow",
                      "equal_tokens", [])


def test_pairing_is_decided_from_the_design(tmp_path, articles_data):
    spec = load_plan(write(tmp_path, base_spec(articles_data))).spec
    shared = _experiment(spec, {"slow": [0, 1], "fast": [0, 1]})
    assert pairing(shared, "fast", "slow").paired
    assert "shares random numbers" in pairing(shared, "fast", "slow").reason
    assert not pairing(_experiment(spec, {"slow": [0, 1], "fast": [0, 2]}), "fast", "slow").paired
    per_arm = spec.model_copy(deep=True)
    per_arm.controlled.seed_policy.streams = "per_arm"
    assert "per_arm" in pairing(_experiment(per_arm, {"slow": [0], "fast": [0]}), "fast",
                                "slow").reason
    forced = spec.model_copy(deep=True)
    forced.analysis.pairing = "unpaired"
    assert not pairing(_experiment(forced, {"slow": [0, 1], "fast": [0, 1]}), "fast",
                       "slow").paired


def test_a_spec_with_outcome_checks_round_trips(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["expected_outcomes"] = ["prose", {"outcome": "fast ramps harder",
                                           "check": _curve_check()}]
    loaded = load_plan(write(tmp_path, spec)).spec
    again = Spec.model_validate(loaded.model_dump(mode="json"))  # as the store keeps it
    assert [o.check is not None for o in again.outcomes] == [False, True]
    assert again.outcomes[1].check.describe() == \
        "max grad_norm over tokens [0, 1,024]: fast > slow"


@pytest.fixture(autouse=True)
def _cpu_threads() -> None:
    """Training here is a few steps of a 1-layer model: one thread keeps it deterministic."""
