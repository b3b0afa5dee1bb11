"""One identity function for runs, one run-id function, and what lmlab 0.1 wrote still loads:
specs and run config files with its section names, and its checkpoints (which resume)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.identity import digest, run_id, same, v1_config_hash
from lmlab.spec.baseline import deep_merge
from lmlab.spec.expand import load_plan
from lmlab.store import Store
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.loop import train


def test_each_identity_ignores_exactly_its_fields() -> None:
    base = RunConfig(budget={"steps": 10})

    def changed(**tree: dict) -> RunConfig:
        return RunConfig.model_validate(deep_merge(base.model_dump(mode="json"), tree))

    lr = changed(optimizer={"lr": 0.5})
    seed = changed(train={"seed": 7})
    watch = changed(evaluation={"every_steps": 3, "diagnostics": {"every_steps": 5}},
                    cadence={"log_every_steps": 2})
    width = changed(model={"d_model": 512})
    longer = changed(budget={"steps": 20})
    for other in (lr, seed, watch, width, longer):  # every change makes another run
        assert digest(other) != digest(base) == base.config_hash
    assert same(watch, base, "trajectory") and not same(lr, base, "trajectory")
    assert same(seed, base, "arm") and not same(seed, base, "trajectory")
    assert same(longer, base, "preflight") and not same(width, base, "preflight")
    # The cost of a step: not the numbers it computes, nor how long the run is.
    assert same(lr, base, "cost") and same(seed, base, "cost") and same(longer, base, "cost")
    assert not same(width, base, "cost")
    # A stored tree is read as today's config (defaults of fields added since filled in).
    stored = base.model_dump(mode="json")
    del stored["train"]["z_loss"]
    assert same(stored, base)


def test_a_spec_and_lmlab_train_name_runs_the_same_way(tmp_path: Path, articles_data) -> None:
    cfg = RunConfig.model_validate({"data": articles_data, "tokenizer": {"kind": "byte"},
                                    "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
                                    "train": {"batch_size": 2, "seq_len": 16, "seed": 3},
                                    "budget": {"steps": 2},
                                    "evaluation": {"max_batches": 1, "test_at_end": False}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(tmp_path / "out") as store:
        assert [r["run_id"] for r in store.runs()] == [run_id("tiny", 3)] == ["tiny-s3"]


# -- lmlab 0.1's files ---------------------------------------------------------------------------

SPEC_0_1 = """\
meta: {name: old, category: recipe, seeds: [0]}
objective: o
hypothesis: {mechanism: m, prediction: p, falsification: f}
controlled:
  tokenizer: {kind: byte}
  model: {n_layer: 1, n_head: 2, d_model: 16}
  train: {batch_size: 2, seq_len: 16}
independent:
  variables: [optimizer.lr]
  arms: {a: {optimizer.lr: 0.001}, b: {optimizer.lr: 0.002}}
budget: {steps: 4}
comparison_axis: equal_steps
evaluation:
  every_steps: 2
  log_every_steps: 2
  checkpoint_every_steps: {ckpt}
expected_outcomes: [x]
"""


def test_a_spec_written_for_0_1_loads_with_its_cadences_moved(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(SPEC_0_1.replace("{ckpt}", "3"))
    plan = load_plan(path)
    cfg = plan.runs[0].config
    assert cfg.cadence.log_every_steps == 2 and cfg.cadence.checkpoint_every_steps == 3
    assert cfg.evaluation.every_steps == 2
    # An error in a moved field still names the line the user wrote.
    path.write_text(SPEC_0_1.replace("{ckpt}", "0"))
    with pytest.raises(UserError) as err:
        load_plan(path)
    line = SPEC_0_1.splitlines().index("  checkpoint_every_steps: {ckpt}") + 1
    assert err.value.line == line and err.value.field == "cadence.checkpoint_every_steps"


def test_a_run_config_file_written_for_0_1_trains(tmp_path: Path, articles_data) -> None:
    old = {"data": articles_data, "tokenizer": {"kind": "byte"},
           "model": {"n_layer": 1, "n_head": 2, "d_model": 16},
           "train": {"batch_size": 2, "seq_len": 16}, "budget": {"steps": 4},
           "eval": {"every_steps": 2, "max_batches": 1, "log_every_steps": 2,
                    "test_at_end": False},
           "diagnostics": {"every_steps": 1000}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(tmp_path / "out") as store:
        (row,) = store.runs()
    cfg = RunConfig.model_validate(row["config"])
    assert cfg.cadence.log_every_steps == 2 and cfg.evaluation.diagnostics.every_steps == 1000


def test_v1_config_hash_is_the_hash_lmlab_0_1_gave() -> None:
    # Computed by lmlab 0.1 (RunConfig.config_hash at commit fd7e937) for this config.
    cfg = RunConfig.model_validate({
        "budget": {"tokens": 1000}, "eval": {"every_steps": 5, "log_every_steps": 3},
        "diagnostics": {"every_steps": 7}, "train": {"seed": 3}})
    assert v1_config_hash(cfg) == "3ebd928a2db01d9f"


def test_a_checkpoint_written_by_0_1_resumes(tmp_path: Path, articles_data) -> None:
    """0.1 wrote one flat dictionary with only the config's hash; it loads with
    ``weights_only=True`` and the run resumes to the rows of an uninterrupted run."""
    cfg = RunConfig.model_validate({
        "data": articles_data, "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.1},
        "train": {"batch_size": 4, "seq_len": 16}, "budget": {"steps": 12},
        "evaluation": {"every_steps": 6, "max_batches": 1, "test_at_end": False},
        "cadence": {"log_every_steps": 4, "checkpoint_every_steps": 5}})

    def rows(store: Store) -> dict:
        return {n: [(r.step, r.value) for r in v] for n, v in store.metrics("r").items()
                if n not in ("step_time_s", "tokens_per_s", "peak_mem_bytes")}

    with Store.open(tmp_path / "ref") as store:
        store.add_run("r", "a", 0, cfg.to_json(), cfg.config_hash)
        train(cfg, "r", store, tmp_path / "ref" / "run")
        reference = rows(store)

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    run_dir = tmp_path / "old" / "run"
    with Store.open(tmp_path / "old") as store:
        store.add_run("r", "a", 0, cfg.to_json(), cfg.config_hash)
        assert train(cfg, "r", store, run_dir, should_stop=stop).status == "interrupted"
        new = load_checkpoint(run_dir)
        flat = {**new["learner"], "step": new["state"]["step"], "samples": new["state"]["samples"],
                "tokens": new["state"]["tokens"], "train_s": new["state"]["seconds"],
                "eval_next_at": new["state"]["next_eval"], "rng": new["state"]["rng"],
                "early_loss": new["recorder"]["early_loss"],
                "pending": [tuple(r) for r in new["recorder"]["pending"]],
                "spikes": new["recorder"]["spikes"], "config_hash": v1_config_hash(cfg),
                "peak_mem_bytes": 0, "wall_s": 1.0}
        torch.save(flat, run_dir / "checkpoint.pt")
        assert load_checkpoint(run_dir)["config"] is None
        assert train(cfg, "r", store, run_dir).status == "completed"
        assert rows(store) == reference
