"""Memory / systems knobs on CPU, on real runs of the training loop: gradient accumulation, SDPA
vs manual attention, activation checkpointing (curve and measured peak memory), precision,
torch.compile's fallback, the optimizer implementation, and the Memory / Systems addendum
computed from the store (numbers, conclusions, the spec's measurement conditions)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.analysis.records import load_runs
from lmlab.analysis.summary import load_experiment
from lmlab.analysis.systems import KNOB_TOLERANCE, Addendum, systems_addendum
from lmlab.config import ModelConfig, RunConfig
from lmlab.data.tokenize import prepare_data
from lmlab.errors import UserError
from lmlab.execute.experiment import run_experiment
from lmlab.model import build_model
from lmlab.report import print_addendum
from lmlab.report.sections.addendum import conclusions, notes
from lmlab.spec.expand import expand, load_plan, load_spec
from lmlab.store import Store
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.loop import train

STEPS = 20
NO_PROBES = {"every_steps": 1000, "layer_grad_norms": False, "norm_grad_norms": False,
             "activation_norms": False, "attention_entropy": False, "update_ratio": False}


def tiny(data: dict, **overrides: dict) -> RunConfig:
    """A 2-layer GPT on bytes of real text: 20 steps of 8 x 32 tokens, constant lr."""
    tree = {
        "data": data,
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"batch_size": 8, "seq_len": 32},
        "budget": {"steps": STEPS, "tokens": STEPS * 8 * 32},
        "evaluation": {"every_steps": 10, "max_batches": 2, "batch_size": 8,
                       "test_at_end": False, "diagnostics": NO_PROBES},
        "cadence": {"log_every_steps": 5},
    }
    for section, values in overrides.items():
        tree[section] = {**tree.get(section, {}), **values}
    return RunConfig.model_validate(tree)


def train_arm(store: Store, out: Path, arm: str, cfg: RunConfig, data=None) -> str:
    run_id = f"{arm}-s{cfg.train.seed}"
    store.add_run(run_id, arm, cfg.train.seed, cfg.to_json(), cfg.config_hash)
    train(cfg, run_id, store, out / "runs" / run_id, data=data)
    return run_id


def losses(store: Store, run_id: str) -> list[float]:
    return [r.value for r in store.metrics(run_id, ["train_loss"])["train_loss"]]


def addendum_of(out: Path) -> Addendum:
    """The addendum of the experiment in ``out``, computed from its run records."""
    return systems_addendum(load_experiment(out))


def metric(store: Store, run_id: str, name: str) -> float | None:
    """A per-run quantity as the records define it (lmlab.analysis.records)."""
    return next(r.metrics[name] for r in load_runs(store) if r.run_id == run_id)


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


ARMS = {
    "ref": {},
    "accum4": {"train": {"grad_accum": 4}},
    "manual": {"model": {"attention": "manual"}},
    "ckpt_every": {"train": {"activation_checkpointing": 1}},
    "ckpt_2nd": {"train": {"activation_checkpointing": 2}},
    "fused": {"optimizer": {"impl": "fused"}},
    "foreach": {"optimizer": {"impl": "foreach"}},
    "plain": {"optimizer": {"impl": "plain"}},
    "bf16": {"train": {"precision": "bf16"}},
    "fp16": {"train": {"precision": "fp16"}},
}


@pytest.fixture(scope="module")
def knobs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """One store, one run per knob setting (seed 0), every run of the real loop on real text."""
    out = tmp_path_factory.mktemp("knobs")
    data_cfg = {"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
                "name": "wikitext-2-test-articles"}
    ref_cfg = tiny(data_cfg)
    bundle = prepare_data(ref_cfg.data, ref_cfg.tokenizer)
    store = Store.open(out)
    configs = {arm: tiny(data_cfg, **over) for arm, over in ARMS.items()}
    ids = {arm: train_arm(store, out, arm, cfg, bundle) for arm, cfg in configs.items()}
    result = addendum_of(out)
    yield store, ids, configs, result, out
    store.close()


def test_accumulation_4x_quarter_batch_equals_1x_full_batch(knobs) -> None:
    store, ids, configs, result, _ = knobs
    assert configs["accum4"].train.micro_batch_size == 2
    assert configs["accum4"].train.tokens_per_step == configs["ref"].train.tokens_per_step
    ref, acc = losses(store, ids["ref"]), losses(store, ids["accum4"])
    # fp32 on CPU: the same gradient summed in another order, over 20 optimizer steps.
    assert max_diff(ref, acc) <= KNOB_TOLERANCE["train.grad_accum"].cpu == 1e-4
    assert ref[-1] < ref[0] - 0.5  # it trained
    beh = result.comparisons["accum4"].behaviour
    assert beh.verdict == "equivalent" and beh.changed == {"train.grad_accum": (1, 4)}
    assert beh.tolerance == 1e-4 and beh.steps == STEPS
    val = [metric(store, ids[a], "final_val_loss") for a in ("ref", "accum4")]
    assert val[0] == pytest.approx(val[1], abs=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_sdpa_and_manual_attention_agree_on_logits_and_gradients(positions: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, positions=positions)
    sdpa = build_model(cfg, 256, 64)
    manual = build_model(cfg.model_copy(update={"attention": "manual"}), 256, 64)
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 256, (4, 64))
    a, b = sdpa(x), manual(x)
    assert (a - b).abs().max().item() <= 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(sdpa.named_parameters(), manual.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_sdpa_and_manual_attention_train_within_tolerance(knobs) -> None:
    store, ids, _, result, _ = knobs
    assert max_diff(losses(store, ids["ref"]), losses(store, ids["manual"])) <= 1e-3
    assert result.comparisons["manual"].behaviour.verdict == "equivalent"


def test_activation_checkpointing_leaves_the_loss_curve_unchanged(knobs) -> None:
    store, ids, _, result, _ = knobs
    ref = losses(store, ids["ref"])
    for arm in ("ckpt_every", "ckpt_2nd"):
        assert max_diff(ref, losses(store, ids[arm])) <= 1e-5, arm
        beh = result.comparisons[arm].behaviour
        assert beh.verdict == "equivalent" and beh.tolerance == 1e-5


def test_optimizer_implementations_give_the_same_curve(knobs) -> None:
    store, ids, _, result, _ = knobs
    ref = losses(store, ids["fused"])
    for impl in ("fused", "foreach", "plain"):
        assert store.run(ids[impl])["summary"]["optimizer_impl"] == impl
        assert max_diff(ref, losses(store, ids[impl])) <= KNOB_TOLERANCE["optimizer.impl"].cpu
    for impl in ("foreach", "plain"):
        assert result.comparisons[impl].behaviour.verdict == "equivalent"


def test_bf16_and_fp16_complete_with_finite_loss(knobs) -> None:
    store, ids, _, result, out = knobs
    for arm in ("bf16", "fp16"):
        run = store.run(ids[arm])
        assert run["status"] == "completed"
        assert all(math.isfinite(v) for v in losses(store, ids[arm]))
        assert math.isfinite(metric(store, ids[arm], "final_val_loss"))
        beh = result.comparisons[arm].behaviour
        assert beh.tolerance == 5e-2 and beh.verdict == "equivalent", beh
    # fp16 trains through a GradScaler (its state travels in the checkpoint); bf16 needs none.
    assert "scale" in load_checkpoint(out / "runs" / ids["fp16"])["learner"]["scaler"]
    assert not load_checkpoint(out / "runs" / ids["bf16"])["learner"]["scaler"]


def test_addendum_numbers_equal_what_the_store_holds(knobs) -> None:
    store, ids, _, result, out = knobs
    assert result == addendum_of(out)  # computed from the records, the same every time
    assert result.reference == "ref"
    assert [r.arm for r in result.rows] == list(ARMS)
    assert result.conditions_met, result.conditions
    assert set(result.conditions) == {"fixed_tokens", "same_seed", "same_effective_batch",
                                      "same_hardware"}
    assert result.conditions["same_hardware"].ok
    assert result.conditions["fixed_tokens"].detail == {"planned": [5120], "reached": [5120]}
    for row in result.rows:
        run = store.run(ids[row.arm])
        s = run["summary"]
        assert row.n == 1
        # Whole-run figures, the run's own definition (lmlab.analysis.records).
        assert row.step_time_s == pytest.approx(s["train_s"] / s["steps"])
        assert row.tokens_per_s == pytest.approx(s["tokens"] / s["train_s"])
        assert row.tokens_per_s == metric(store, run["run_id"], "tokens_per_s")
        marks = store.metrics(run["run_id"], ["step_time_s"])["step_time_s"]
        first, last = marks[0], marks[-1]  # steady state: after the first log interval
        assert row.steady_tokens_per_s == pytest.approx(
            (last.tokens - first.tokens) / (last.wall_s - first.wall_s))
        assert row.peak_mem_bytes == s["peak_mem_bytes"]
        assert row.final_val_loss == store.last_metric(run["run_id"], "val_loss")
        assert row.tokens_per_s_std is not None and row.tokens_per_s_std >= 0
    ref = result.rows[0]
    lines = {c.label: c.lines for c in conclusions(result)}
    for row, (arm, comp) in zip(result.rows[1:], result.comparisons.items(), strict=True):
        assert comp.arm == row.arm == arm
        assert comp.memory_saved_bytes == ref.peak_mem_bytes - row.peak_mem_bytes
        assert comp.speed_change_pct == pytest.approx(
            100 * (row.tokens_per_s / ref.tokens_per_s - 1))
        assert any(line.startswith(f"{arm}: ") for line in lines["Memory saved"])
    behaviour = "; ".join(lines["Any training behavior difference"])
    assert "accum4: equivalent within tolerance" in behaviour
    assert "% tokens/sec vs ref" in "; ".join(lines["Speed change"])


def test_a_change_of_model_is_judged_without_a_numerical_tolerance(knobs, tmp_path) -> None:
    configs = knobs[2]
    wide = configs["ref"].model_copy(update={"model": configs["ref"].model.model_copy(
        update={"d_model": 64})})
    with Store.open(tmp_path) as s2:
        for arm in ("ref", "wide"):
            cfg = configs["ref"] if arm == "ref" else wide
            train_arm(s2, tmp_path, arm, cfg)
    beh = addendum_of(tmp_path).comparisons["wide"].behaviour
    assert beh.verdict == "no_tolerance" and beh.tolerance is None
    assert beh.max_abs_diff is not None and beh.max_abs_diff > 1e-3


class _Broken(torch.nn.Module):
    """What a failed lazy compile looks like: building works, the first call raises."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InductorError: no working C++ compiler (simulated)")


@pytest.mark.parametrize("failure", ["at_compile", "at_first_call"])
def test_compile_falls_back_to_eager_with_an_event(failure, knobs, tmp_path, monkeypatch) -> None:
    store, ids, configs, _, _ = knobs

    def fake_compile(model, mode=None, **kw):
        if failure == "at_compile":
            raise RuntimeError("torch.compile is not supported here (simulated)")
        return _Broken(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = configs["ref"].model_copy(update={"train": configs["ref"].train.model_copy(
        update={"compile": "max-autotune"})})
    with Store.open(tmp_path) as s2:
        run_id = train_arm(s2, tmp_path, "compiled", cfg)
        events = s2.events(run_id, "compile_fallback")
        assert s2.run(run_id)["status"] == "completed"
        assert len(events) == 1 and "simulated" in events[0]["detail"]["reason"]
        # The fallback is the eager model: the same curve as the uncompiled reference.
        assert max_diff(losses(store, ids["ref"]), losses(s2, run_id)) <= 1e-5
    result = addendum_of(tmp_path)
    assert result.compile_fallbacks == [run_id]
    assert any("compile fell back" in note for note in notes(result))


# ---- the spec's measurement conditions --------------------------------------------------------


def memory_spec(data: dict, **changes) -> dict:
    spec = {
        "meta": {"name": "mem", "category": "memory", "seeds": [0]},
        "objective": "Does activation checkpointing lower peak memory at the same loss?",
        "hypothesis": {"mechanism": "recompute instead of store", "prediction": "less memory",
                       "falsification": "no saving"},
        "controlled": {"data": data, "tokenizer": {"kind": "byte"},
                       "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
                       "train": {"batch_size": 8, "seq_len": 32}},
        "independent": {"variables": ["train.grad_accum"],
                        "arms": {"full": {"train.grad_accum": 1}, "accum4": {"train.grad_accum": 4}}},
        "budget": {"tokens": 1024},
        "comparison_axis": "equal_tokens",
        "expected_outcomes": ["same curve"],
        "preflight": {"enabled": False},
    }
    for key, value in changes.items():
        spec[key] = value
    return spec


def plan_of(tmp_path: Path, spec: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return expand(*load_spec(path))


def test_spec_enforces_the_addendum_measurement_conditions(tmp_path, articles_data) -> None:
    plan = plan_of(tmp_path, memory_spec(articles_data))  # grad_accum may vary
    assert {r.config.train.batch_size for r in plan.runs} == {8}
    batch = {"variables": ["train.batch_size"],
             "arms": {"b8": {"train.batch_size": 8}, "b16": {"train.batch_size": 16}}}
    with pytest.raises(UserError, match="same effective batch") as e:
        plan_of(tmp_path, memory_spec(articles_data, independent=batch))
    assert e.value.field == "independent.arms.b8.train.batch_size" and e.value.line
    with pytest.raises(UserError, match="fixed tokens per run") as e:
        plan_of(tmp_path, memory_spec(articles_data, comparison_axis="equal_steps",
                                      budget={"steps": 4}))
    assert e.value.field == "comparison_axis"
    # Any category can ask for the addendum; a memory spec can switch it off.
    with pytest.raises(UserError, match="systems_addendum: true"):
        plan_of(tmp_path, memory_spec(articles_data, independent=batch, systems_addendum=True,
                                      meta={"name": "x", "category": "hyperparam"}))
    assert len(plan_of(tmp_path, memory_spec(articles_data, independent=batch,
                                             systems_addendum=False)).runs) == 2


def test_spec_refuses_flash_attention_in_fp32(tmp_path, articles_data) -> None:
    arms = {"variables": ["model.sdpa_backend"],
            "arms": {"auto": {"model.sdpa_backend": "auto"}, "flash": {"model.sdpa_backend": "flash"}}}
    with pytest.raises(UserError, match="no fp32 kernel") as e:
        plan_of(tmp_path, memory_spec(articles_data, independent=arms))
    assert e.value.field == "independent.arms.flash.model.sdpa_backend"
    spec = memory_spec(articles_data, independent=arms)
    spec["controlled"]["train"]["precision"] = "bf16"
    assert len(plan_of(tmp_path, spec).runs) == 2


def test_memory_examples_keep_the_addendum_conditions() -> None:
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("memory_*.yaml"))
    assert examples
    for path in examples:
        plan = load_plan(path)
        assert plan.spec.meta.category == "memory" and plan.spec.comparison_axis == "equal_tokens"
        assert len({r.config.train.batch_size for r in plan.runs}) == 1
        assert len({r.config.budget.tokens for r in plan.runs}) == 1


# ---- end to end: one process per run, measured peak memory --------------------------------------


def test_memory_experiment_end_to_end_checkpointing_lowers_peak_memory(
        tmp_path, articles_data, monkeypatch, capsys) -> None:
    """A ``category: memory`` spec through run_experiment: every run in its own worker process
    (its own peak RSS), the addendum computed and stored at the end. The shape makes activations
    dominate (8 layers of materialised 256x256 attention, tiny d_model and vocabulary), so
    checkpointing every block must lower the measured peak, and leave the curve unchanged."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers: steady on a shared machine
    spec = memory_spec(articles_data)
    spec["controlled"] = {
        "data": articles_data, "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 8, "n_head": 4, "d_model": 32, "attention": "manual"},
        "train": {"batch_size": 8, "seq_len": 256},
    }
    spec["independent"] = {"variables": ["train.activation_checkpointing"],
                           "arms": {"none": {"train.activation_checkpointing": 0},
                                    "every_block": {"train.activation_checkpointing": 1}}}
    spec["budget"] = {"tokens": 3 * 8 * 256}
    spec["evaluation"] = {"every_steps": 100, "max_batches": 1, "batch_size": 2,
                          "log_every_steps": 1, "test_at_end": False, "diagnostics": NO_PROBES}
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "exp"
    result = run_experiment(load_plan(path), out)
    assert set(result["results"].values()) == {"completed"}
    add = addendum_of(out)
    with Store.open(out) as store:
        peaks = {r["arm"]: r["summary"]["peak_mem_bytes"] for r in store.runs()}
        kinds = {r["summary"]["peak_mem_kind"] for r in store.runs()}
    assert kinds == {"rss"}
    # Measured 61 MiB less (619 against 555 MiB) on 2 quiet cores; half of that is asked for.
    assert peaks["every_block"] < peaks["none"] - 30 * 2**20, peaks
    rows = {r.arm: r for r in add.rows}
    assert rows["none"].peak_mem_bytes == peaks["none"]
    comp = add.comparisons["every_block"]
    assert comp.memory_saved_bytes == peaks["none"] - peaks["every_block"] > 0
    memory = {c.label: c.value for c in conclusions(add)}["Memory saved"]
    assert "every_block:" in memory and "less than none" in memory
    beh = comp.behaviour
    assert beh.verdict == "equivalent" and beh.max_abs_diff <= 1e-5, beh
    assert add.conditions_met
    print_addendum(out)
    printed = capsys.readouterr().out
    for text in ("Measurement Conditions", "Tokens/sec", "Memory saved", "every_block",
                 "equivalent within tolerance"):
        assert text in printed
