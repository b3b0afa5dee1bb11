"""The report's judgements (lmlab.analysis.findings) on synthetic run records: pure functions,
checked on numbers chosen so that each answer is known in advance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmlab.analysis import findings as f
from lmlab.analysis.records import RunRecord
from lmlab.analysis.stats import welch
from lmlab.analysis.summary import Experiment, summarize_arms
from lmlab.analysis.verdict import HypothesisVerdict
from lmlab.names import RUN_METRICS
from lmlab.spec.schema import Spec
from lmlab.store import MetricRow


def record(arm: str, seed: int, *, status: str = "completed", val: Sequence[float] = (),
           events: Sequence[str] = (), summary: dict[str, Any] | None = None,
           **metrics: float) -> RunRecord:
    """A run with validation losses ``val`` (one evaluation every 100 steps of 1,000 tokens and
    10 s) and the given per-run metrics; everything else undefined."""
    curves = {"val_loss": [MetricRow(100 * i, 1000 * i, 10.0 * i, v) for i, v in enumerate(val)]}
    run = RunRecord(f"{arm}-s{seed}", arm, seed, status, {}, {}, summary or {}, None, curves,
                    [{"kind": k, "step": 5, "tokens": 50, "wall_s": 0.5, "detail": {"z": 9.0}}
                     for k in events])
    run.metrics = dict.fromkeys(RUN_METRICS) | {"divergence_events": 0.0, "nan_events": 0.0,
                                                "spike_events": 0.0} | metrics
    return run


def experiment(runs: list[RunRecord], values: dict[str, dict[str, Any]] | None = None,
               preflight: dict[str, Any] | None = None) -> Experiment:
    arms = list(dict.fromkeys(r.arm for r in runs))
    values = values or {arm: {} for arm in arms}
    variables = sorted({p for v in values.values() for p in v})
    plan = {"variables": variables, "runs": [{"arm": a, "values": v} for a, v in values.items()]}
    return Experiment(Path("."), "x", None, None, plan, preflight, runs, arms, arms[0],
                      "equal_tokens", [])


def finals(arm: str, losses: Sequence[float], **kw: Any) -> list[RunRecord]:
    return [record(arm, i, final_val_loss=v, **kw) for i, v in enumerate(losses)]


def test_best_arm_and_runner_up_use_welchs_test() -> None:
    exp = experiment(finals("a", [5.00, 5.10, 5.05]) + finals("b", [4.80, 4.82, 4.81])
                     + finals("c", [5.50, 5.52, 5.51]))
    arms = summarize_arms(exp)
    assert f.best_arm(arms, "final_val_loss") == "b"
    r = f.runner_up(arms, "b", "final_val_loss")
    assert r is not None and r.arm == "a"
    assert r.test == welch([4.80, 4.82, 4.81], [5.00, 5.10, 5.05])
    assert r.separated is True
    # Higher is better for throughput.
    fast = experiment([record("slow", 0, tokens_per_s=1e4), record("fast", 0, tokens_per_s=2e4)])
    fast_arms = summarize_arms(fast)
    assert f.best_arm(fast_arms, "tokens_per_s") == "fast"
    one = f.runner_up(fast_arms, "fast", "tokens_per_s")
    assert one is not None and one.separated is None and "at least 2 values" in one.test.reason


def test_no_best_arm_without_a_finite_value() -> None:
    exp = experiment([record("a", 0, status="diverged"), record("b", 0, status="failed")])
    arms = summarize_arms(exp)
    assert f.best_arm(arms, "final_val_loss") is None
    found = f.find(exp, arms, HypothesisVerdict("inconclusive", "no checks", []), "final_val_loss")
    assert found.best is None and found.runner_up is None and found.edge_of_range == []
    assert found.efficiency is None


def test_seeds_that_disagree_more_than_the_arms_do() -> None:
    exp = experiment(finals("wide", [4.0, 5.0, 6.0]) + finals("tight", [5.10, 5.11, 5.12]))
    found = f.disagreeing_seeds(summarize_arms(exp), "final_val_loss")
    assert [d.arm for d in found] == ["wide"]
    assert found[0].std == pytest.approx(1.0) and found[0].gap == pytest.approx(0.11)


def test_under_trained_arms_fall_by_more_than_the_seed_spread() -> None:
    falling = [record("falling", i, val=[9.0, 6.0, 5.5, 5.0 + 0.01 * i], final_val_loss=5.0 + 0.01 * i)
               for i in range(2)]
    flat = [record("flat", i, val=[9.0, 5.0, 5.0, 5.0 + 0.1 * i], final_val_loss=5.0 + 0.1 * i)
            for i in range(2)]
    # One seed: no spread, so "still improving" means by more than 1% of the loss.
    single = [record("single", 0, val=[9.0, 6.0, 5.1, 5.0], final_val_loss=5.0)]
    diverged = [record("gone", 0, status="diverged", val=[9.0, 6.0, 5.0])]
    found = f.under_trained(summarize_arms(experiment(falling + flat + single + diverged)))
    assert set(found) == {"falling", "single"}
    assert found["falling"].drop == pytest.approx(np.mean([6.0 - 5.0, 6.0 - 5.01]))
    assert found["falling"].spread == pytest.approx(0.01 * math.sqrt(0.5))
    assert found["single"].spread is None and found["single"].intervals == 2


def test_noisy_throughput_and_instability() -> None:
    runs = [record("noisy", 0, tokens_per_s=10_000.0, max_grad_norm=2.0),
            record("noisy", 1, tokens_per_s=14_000.0, max_grad_norm=4.0, events=["spike"]),
            record("steady", 0, tokens_per_s=10_000.0, max_grad_norm=1.0),
            record("steady", 1, tokens_per_s=10_100.0, max_grad_norm=1.0),
            record("blown", 0, status="diverged", events=["nan", "nan", "resume"],
                   max_grad_norm=math.inf)]
    arms = summarize_arms(experiment(runs))
    noisy = f.noisy_throughput(arms)
    assert [n.arm for n in noisy] == ["noisy"] and noisy[0].relative > f.NOISY_THROUGHPUT
    stability = {s.arm: s for s in f.instability(arms)}
    assert stability["noisy"].events == {"spike": 1} and stability["noisy"].max_grad_norm == 3.0
    assert stability["steady"].stable and stability["steady"].max_grad_norm == 1.0
    assert stability["blown"].events == {"nan": 2} and stability["blown"].max_grad_norm == math.inf
    spikes = f.spikes(experiment(runs))
    assert set(spikes) == {"noisy"} and spikes["noisy"].seeds == (1,)
    assert spikes["noisy"].n_runs == 2 and spikes["noisy"].worst_seed == 1


def test_interactions_in_a_crossed_design() -> None:
    values = {"a": {"lr": 1e-3, "bs": 8}, "b": {"lr": 3e-3, "bs": 8},
              "c": {"lr": 1e-3, "bs": 16}, "d": {"lr": 3e-3, "bs": 16}}
    runs = (finals("a", [5.0]) + finals("b", [5.1]) + finals("c", [4.9]) + finals("d", [4.7]))
    exp = experiment(runs, values)
    found = f.interactions(exp, summarize_arms(exp), "final_val_loss")
    assert found.variables == ("bs", "lr")
    by_var = {i.variable: i for i in found.pairs}
    assert by_var["lr"].other == "bs" and by_var["lr"].best_at == ((8, 1e-3), (16, 3e-3))
    assert by_var["lr"].depends
    assert by_var["bs"].best_at == ((1e-3, 16), (3e-3, 16)) and not by_var["bs"].depends
    # Arms that do not cross the variables: nothing to read.
    zipped = experiment(finals("a", [5.0]) + finals("d", [4.7]), {"a": values["a"],
                                                                  "d": values["d"]})
    assert f.interactions(zipped, summarize_arms(zipped), "final_val_loss").pairs == ()


def test_edge_of_range_continues_the_sweeps_spacing() -> None:
    values = {"low": {"lr": 1e-3, "warmup": 0}, "mid": {"lr": 3e-3, "warmup": 10},
              "high": {"lr": 9e-3, "warmup": 20}}
    exp = experiment(finals("low", [5.0]) + finals("mid", [4.9]) + finals("high", [4.8]), values)
    edges = {e.variable: e for e in f.edge_of_range(exp, "high")}
    assert set(edges) == {"lr", "warmup"}
    assert edges["lr"].upward and edges["lr"].next_value == pytest.approx(2.7e-2)
    assert edges["warmup"].next_value == 30 and (edges["warmup"].low, edges["warmup"].high) == (0, 20)
    # Below a natural zero there is nothing to try; inside the range there is no edge.
    down = {e.variable: e for e in f.edge_of_range(exp, "low")}
    assert set(down) == {"lr"} and not down["lr"].upward
    assert down["lr"].next_value == pytest.approx(1e-3 / 3)
    assert f.edge_of_range(exp, "mid") == []


def test_efficiency_is_per_seed_to_the_worst_final_loss() -> None:
    fast = [record("fast", i, val=[9.0, 5.5, 5.0, 4.9], final_val_loss=4.9) for i in range(2)]
    slow = [record("slow", 0, val=[9.0, 7.0, 6.0, 5.5], final_val_loss=5.5, tokens_per_s=1e4)]
    e = f.efficiency(summarize_arms(experiment(fast + slow)))
    assert e is not None and e.target == 5.5
    assert e.reach["fast"].tokens.mean == 1000 and e.reach["fast"].tokens.n == 2
    assert e.reach["slow"].tokens.mean == 3000 and e.reach["slow"].seconds.mean == 30.0
    assert e.fewest_tokens == "fast" and e.least_time == "fast"
    assert e.speeds == {"slow": 1e4}


def test_phase1_needs_a_supported_verdict_and_every_run_finished() -> None:
    supported = HypothesisVerdict("supported", "all 1 checks supported", [])
    done = experiment([*finals("a", [5.0]), record("b", 0, status="diverged")])
    p = f.phase1(done, supported, {})
    assert p.ready and p.diverged == ("b-s0",) and p.failed == ()
    blocked = experiment([*finals("a", [5.0]), record("b", 0, status="failed"),
                          record("b", 1, status="pending")], preflight={"passed": False})
    p = f.phase1(blocked, supported, {"a": f.Progress(0.1, None)})
    assert not p.ready and p.preflight_failed
    assert p.failed == ("b-s0",) and p.unfinished == ("b-s1",) and p.under_trained == ("a",)


def test_memory_kind_from_the_runs_or_their_provenance() -> None:
    cpu = record("a", 0, summary={"peak_mem_kind": "rss"})
    gpu = record("b", 0, summary={"peak_mem_kind": "cuda_allocated"})
    assert f.memory_kind(experiment([cpu])) == "rss"
    assert f.memory_kind(experiment([cpu, gpu])) == "mixed"
    old = record("c", 0)
    old.provenance = {"gpu_count": 1, "device": "cuda:0"}
    assert f.memory_kind(experiment([old])) == "cuda_allocated"


def test_progress_is_judged_against_seed_noise_and_stated_either_way() -> None:
    improving = [record("up", i, val=[9.0, 6.0, 5.5, 5.0 + 0.01 * i], final_val_loss=5.0 + 0.01 * i)
                 for i in range(2)]
    flat = [record("flat", i, val=[9.0, 5.0, 5.0, 5.0 + 0.1 * i], final_val_loss=5.0 + 0.1 * i)
            for i in range(2)]
    worse = [record("worse", i, val=[9.0, 5.0, 5.2, 5.5 + 0.01 * i], final_val_loss=5.5 + 0.01 * i)
             for i in range(2)]
    found = f.progress(summarize_arms(experiment(improving + flat + worse)))
    assert {arm: p.state for arm, p in found.items()} == \
        {"up": "improving", "flat": "flat", "worse": "worsening"}
    assert found["flat"].yardstick == pytest.approx(0.1 * math.sqrt(0.5))
    assert f.under_trained(summarize_arms(experiment(improving + flat))).keys() == {"up"}


def test_a_run_worse_at_its_last_evaluation_is_flagged_like_for_like() -> None:
    runs = [record("a", 0, val=[9.0, 6.0, 5.0, 5.3], final_val_loss=5.3),
            record("a", 1, val=[9.0, 6.0, 5.0, 4.9], final_val_loss=4.9)]
    flagged = f.worse_at_end(summarize_arms(experiment(runs)))
    assert [(w.run_id, w.before.loss, w.last.loss) for w in flagged] == [("a-s0", 5.0, 5.3)]
    assert flagged[0].rise == pytest.approx(0.3) and flagged[0].beyond_noise is True
    # Capped periodic evaluations and a full final one measure different text: the rise from
    # the last capped one to the final one is not compared; the capped ones are.
    capped = [record("a", 0, val=[9.0, 6.0, 5.0, 5.3, 4.0], final_val_loss=4.0)]
    capped[0].config = {"evaluation": {"max_batches": 4}}
    flagged = f.worse_at_end(summarize_arms(experiment(capped)))
    assert [(w.before.loss, w.last.loss, w.capped) for w in flagged] == [(5.0, 5.3, True)]


def test_a_prediction_about_instability_is_read_and_held_against_the_runs() -> None:
    runs = [*finals("warmup", [5.0]), *finals("no_warmup", [5.1])]
    runs[0].events = [{"kind": "spike", "step": 3, "tokens": 30, "wall_s": 0.3, "detail": {}}]
    exp = experiment(runs)
    exp.spec = Spec.model_validate({
        "meta": {"name": "x", "category": "recipe"}, "objective": "o",
        "hypothesis": {"mechanism": "m", "falsification": "f",
                       "prediction": "Warmup ends lower; neither arm diverges, but the "
                                     "no-warmup arm shows more loss spikes."},
        "independent": {"variables": ["schedule.warmup_steps"],
                        "arms": {"warmup": {}, "no_warmup": {}}},
        "budget": {"steps": 10}, "comparison_axis": "equal_steps",
        "expected_outcomes": ["no_warmup: possibly loss spikes"]})
    read = {(p.kind, p.arms, p.expect): p for p in f.predicted_instability(exp)}
    assert read[("divergence", ("warmup", "no_warmup"), "absent")].agrees is True
    spikes = read[("spike", ("no_warmup",), "more")]
    assert spikes.agrees is False and spikes.seen_in == ("warmup",)
    assert read[("spike", ("no_warmup",), "possible")].agrees is None
