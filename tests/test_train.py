"""The core training path on real text: loss falls, seeds reproduce, a killed run resumes to
identical results, and the CLI reports what the store holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmlab.analysis.records import STATUS_KEYS, RunRecord, load_runs
from lmlab.config import RunConfig
from lmlab.store import Store
from lmlab.train.loop import train


def tiny_config(articles_data: dict, **overrides: dict) -> RunConfig:
    tree = {
        "data": articles_data,
        "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 48},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "train": {"batch_size": 8, "seq_len": 32},
        "budget": {"steps": 40},
        "evaluation": {"every_steps": 10, "max_batches": 8, "test_at_end": False,
                       "diagnostics": {"every_steps": 10}},
        "cadence": {"log_every_steps": 5, "checkpoint_every_steps": 10},
    }
    for section, values in overrides.items():
        tree[section] = {**tree.get(section, {}), **values}
    return RunConfig.model_validate(tree)


def record(store: Store, run_id: str = "r") -> RunRecord:
    return next(r for r in load_runs(store) if r.run_id == run_id)


def run(cfg: RunConfig, out: Path, run_id: str = "r") -> Store:
    store = Store.open(out)
    store.add_run(run_id, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    train(cfg, run_id, store, out / "runs" / run_id)
    return store


def curve(store: Store, name: str, run_id: str = "r") -> list[tuple[int, int, float]]:
    return [(r.step, r.tokens, r.value) for r in store.metrics(run_id, [name])[name]]


def test_loss_falls_on_real_text_and_every_row_is_complete(tmp_path, articles_data):
    store = run(tiny_config(articles_data), tmp_path)
    val = curve(store, "val_loss")
    assert val[0][0] == 0 and val[-1][0] == 40
    assert val[-1][2] < val[0][2] - 0.5, val  # from ~ln(512)=6.2 it must fall clearly
    train_loss = curve(store, "train_loss")
    assert [s for s, _, _ in train_loss] == list(range(1, 41))  # one row per step, none missing
    assert all(t == s * 8 * 32 for s, t, _ in train_loss)  # tokens seen = step x batch x seq
    run_row = store.run("r")
    assert run_row["status"] == "completed"
    s = run_row["summary"]
    assert s["steps"] == 40 and s["tokens"] == 40 * 256
    rec = record(store)
    assert rec.metrics["final_val_loss"] == val[-1][2] and rec.last_eval.step == 40
    assert rec.metrics["tokens_per_s"] == pytest.approx(40 * 256 / s["train_s"])
    assert rec.metrics["peak_mem_bytes"] == s["peak_mem_bytes"] > 0
    assert rec.stopped_at_step is None
    prov = run_row["provenance"]
    assert prov["corpus"] == "wikitext-2-test-articles" and prov["is_wikitext2"] is False
    assert prov["tokenizer_hash"] and prov["data_hash"] and prov["torch_version"]
    for name in ("grad_norm", "lr", "step_time_s", "tokens_per_s", "peak_mem_bytes",
                 "val_ppl", "val_bpb", "val_word_ppl"):
        assert store.metrics("r", [name])[name], name


def test_final_evaluation_covers_the_full_split(tmp_path, articles_data):
    """max_batches caps the periodic evaluations; the final one is exact over the whole split."""
    from lmlab.data.tokenize import prepare_data

    cfg = tiny_config(articles_data, budget={"steps": 5}, evaluation={"every_steps": 100})
    store = run(cfg, tmp_path)
    data = prepare_data(cfg.data, cfg.tokenizer)
    # perplexity, bits per byte and word perplexity all derive from one total NLL
    final = {n: store.last_metric("r", n) for n in ("val_loss", "val_bpb", "val_word_ppl")}
    n_pred = len(data.splits["valid"]) - 1
    total_nll = final["val_loss"] * n_pred
    assert final["val_bpb"] == pytest.approx(total_nll / (data.stats["valid"].n_bytes * 0.6931471805599453), rel=1e-9)
    import math

    assert math.log(final["val_word_ppl"]) == pytest.approx(total_nll / data.stats["valid"].n_words, rel=1e-9)


def test_same_seed_same_curve_other_seed_other_curve(tmp_path, articles_data):
    cfg = tiny_config(articles_data, budget={"steps": 15}, model={"dropout": 0.1})
    a = curve(run(cfg, tmp_path / "a"), "train_loss")
    b = curve(run(cfg, tmp_path / "b"), "train_loss")
    assert a == b  # bit-identical on CPU, dropout included
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    c = curve(run(other, tmp_path / "c"), "train_loss")
    assert c != a


def _values(store: Store, run_id: str = "r") -> dict[str, list[tuple[int, int, float]]]:
    timing = {"step_time_s", "tokens_per_s", "peak_mem_bytes"}
    return {name: [(r.step, r.tokens, r.value) for r in rows]
            for name, rows in store.metrics(run_id).items() if name not in timing}


def _write_config(path: Path, cfg: RunConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_killed_run_resumes_to_identical_results(tmp_path, articles_data):
    """SIGKILL a real `lmlab train` after its first checkpoint, rerun it, and compare every
    metric row with an uninterrupted run: nothing duplicated, nothing missing, same values."""
    cfg = tiny_config(articles_data, budget={"steps": 60}, model={"dropout": 0.1},
                      cadence={"checkpoint_every_steps": 10}, evaluation={"every_steps": 20})
    config = _write_config(tmp_path / "resume.yaml", cfg)
    # The reference runs the same way (a process with its default threads), uninterrupted.
    ref_cmd = [sys.executable, "-m", "lmlab.cli", "train", str(config), "--out", str(tmp_path / "ref")]
    subprocess.run(ref_cmd, check=True, capture_output=True)
    with Store.open(tmp_path / "ref") as s:
        reference = _values(s, "resume-s0")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmlab.cli", "train", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "runs" / "resume-s0" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        with Store.open(out) as s:
            rows = s.metrics("resume-s0", ["train_loss"]).get("train_loss", []) \
                if s.run("resume-s0") else []
        if ckpt.exists() and rows and rows[-1].step >= 25:  # past a checkpoint, mid-interval
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store.open(out) as s:
        assert s.run("resume-s0")["status"] == "running"  # killed: nobody marked it
        assert s.metrics("resume-s0", ["train_loss"])["train_loss"][-1].step < 60

    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Store.open(out) as s:
        resumed = _values(s, "resume-s0")
        assert s.run("resume-s0")["status"] == "completed"
        assert [e["kind"] for e in s.events("resume-s0")] == ["resume"]
    assert resumed == reference


def test_ctrl_c_interrupts_cleanly_and_resumes_identically(tmp_path, articles_data):
    cfg = tiny_config(articles_data, budget={"steps": 30})
    reference = _values(run(cfg, tmp_path / "ref"))
    store = Store.open(tmp_path / "int")
    store.add_run("r", "arm", 0, cfg.to_json(), cfg.config_hash)
    calls = {"n": 0}

    def stop_after_some_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 13  # between steps 13 and 14: not on a log or checkpoint boundary

    result = train(cfg, "r", store, tmp_path / "int" / "runs" / "r", should_stop=stop_after_some_steps)
    assert result.status == "interrupted" and store.run("r")["status"] == "interrupted"
    train(cfg, "r", store, tmp_path / "int" / "runs" / "r")
    assert store.run("r")["status"] == "completed"
    assert _values(store) == reference


def test_cli_train_and_status_json(tmp_path, articles_data):
    cfg = tiny_config(articles_data, budget={"steps": 10})
    config = _write_config(tmp_path / "quick.yaml", cfg)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(config), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    status = subprocess.run([sys.executable, "-m", "lmlab.cli", "status", str(out), "--json"],
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert len(rows) == 1
    row = rows[0]
    with Store.open(out) as s:
        assert row["final_val_loss"] == s.last_metric("quick-s0", "val_loss")
    assert row["status"] == "completed" and row["steps"] == 10 and row["tokens"] == 10 * 256
    assert row["stopped_at_step"] is None and row["last_eval"]["step"] == 10
    assert list(row) == list(STATUS_KEYS)


def test_cli_user_errors_exit_2_with_file_line_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: local\n  path: /nowhere\nmodel:\n  n_layer: many\nbudget: {steps: 5}\n")
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{bad}:5 model.n_layer" in done.stderr and "Traceback" not in done.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("data: {dataset: local, path: /nowhere/at/all}\nbudget: {steps: 5}\n")
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(missing), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2 and "/nowhere/at/all" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    unknown = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", "--bogus"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2


def test_a_different_config_never_resumes_another_runs_checkpoint(tmp_path, articles_data):
    cfg = tiny_config(articles_data, budget={"steps": 5})
    config = _write_config(tmp_path / "same.yaml", cfg)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmlab.cli", "train", str(config), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    with Store.open(out) as s:
        before = s.metrics("same-s0", ["train_loss"])["train_loss"]
    changed = tiny_config(articles_data, budget={"steps": 5}, optimizer={"lr": 1e-2})
    _write_config(config, changed)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and "different config" in done.stderr, done.stderr
    with Store.open(out) as s:  # the first run's results are untouched
        assert s.metrics("same-s0", ["train_loss"])["train_loss"] == before
