"""Exports copy every run's config, metric rows (at their step), events and summary: each
checked by reading back what was written with the tracker's own reader (TensorBoard's event
accumulator, W&B's reader of its offline run files, MLflow's client on a SQLite store).

The trackers are the optional extra ``lmlab[tracking]``; CI installs it, so there (``CI`` set)
a missing tracker fails instead of skipping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.export import export
from lmlab.store import Store


@pytest.fixture
def experiment(tmp_path):
    out = tmp_path / "exp"
    cfg = RunConfig()
    with Store.open(out) as store:
        for arm in ("a", "b"):
            rid = f"{arm}-s0"
            store.add_run(rid, arm, 0, cfg.to_json(), cfg.config_hash)
            store.log_many(rid, [(s, s * 100, s * 0.1, {"train_loss": 5.0 - 0.1 * s,
                                                         "grad_norm/block.0": 1.0 / s})
                                 for s in range(1, 11)])
            store.log_metrics(rid, 10, 1000, 1.0, {"val_loss": 4.2})
            store.log_event(rid, 4, 400, 0.4, "spike", {"z": 7.0})
            store.set_status(rid, "completed", summary={"final_val_loss": 4.2, "tokens_per_s": 1000.0})
    return out


def tracker(module: str):
    """The tracker's module; skipped where it is not installed, except in CI."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


def test_tensorboard_export_holds_every_row(experiment, tmp_path):
    tracker("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    where = export(experiment, "tensorboard", tmp_path / "tb")
    acc = EventAccumulator(str(where / "a-s0"))
    acc.Reload()
    losses = acc.Scalars("train_loss")
    assert [e.step for e in losses] == list(range(1, 11))
    assert all(math.isclose(e.value, 5.0 - 0.1 * e.step, rel_tol=1e-6) for e in losses)
    assert [e.value for e in acc.Scalars("tokens")][:3] == [100.0, 200.0, 300.0]
    assert acc.Scalars("val_loss")[0].step == 10
    assert len(acc.Scalars("grad_norm/block.0")) == 10


def test_mlflow_export_reads_back_from_its_sqlite_store(experiment, tmp_path, monkeypatch):
    tracker("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory (./mlruns)
    uri = export(experiment, "mlflow", tmp_path / "ml")
    assert uri == f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["a-s0", "b-s0"]
    for name, run in runs.items():
        rid = run.info.run_id
        history = client.get_metric_history(rid, "train_loss")
        assert sorted((m.step, m.value) for m in history) == \
            [(s, pytest.approx(5.0 - 0.1 * s)) for s in range(1, 11)]
        # lmlab's own metric names, slashes included, and tokens as a metric of their own
        assert len(client.get_metric_history(rid, "grad_norm/block.0")) == 10
        assert [m.value for m in client.get_metric_history(rid, "tokens")][:1] == [100.0]
        assert [m.step for m in client.get_metric_history(rid, "val_loss")] == [10]
        assert run.data.params["optimizer.lr"] == str(RunConfig().optimizer.lr)
        assert run.data.tags["lmlab.arm"] == name[0] and run.info.status == "FINISHED"
        record = json.loads((tmp_path / "ml" / "artifacts").joinpath(
            rid, "artifacts", "lmlab_run.json").read_text())
        assert record["events"][0]["kind"] == "spike"
        assert record["summary"]["final_val_loss"] == 4.2
    assert not (tmp_path / "mlruns").exists()


def _wandb_records(run_dir) -> list[dict]:
    """The records of one offline W&B run, as W&B's own reader of its run files prints them."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(run_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_wandb_export_reads_back_from_its_offline_run_files(experiment, tmp_path, monkeypatch):
    tracker("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    monkeypatch.setenv("WANDB_SILENT", "true")
    where = export(experiment, "wandb", tmp_path / "wb")
    run_dirs = sorted((where / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    seen = {}
    for run_dir in run_dirs:
        records = _wandb_records(run_dir)
        run = next(r["run"] for r in records if r["type"] == "run")
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        rows: dict[int, dict] = {}
        for h in history:  # the events table's row carries the last step along (step_sync)
            if "trainer/step" in h:
                rows.setdefault(int(h["trainer/step"]), {}).update(h)
        assert sorted(rows) == list(range(1, 11))
        assert all(rows[s]["train_loss"] == pytest.approx(5.0 - 0.1 * s) for s in rows)
        assert all(rows[s]["grad_norm/block.0"] == pytest.approx(1.0 / s) for s in rows)
        assert rows[3]["tokens"] == 300 and rows[10]["val_loss"] == pytest.approx(4.2)
        config = run["config"]["update"]
        assert config["optimizer.lr"] == RunConfig().optimizer.lr and run["run_group"] == "exp"
        summary: dict = {}
        for r in records:
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
        assert summary["final_val_loss"] == 4.2 and summary["status"] == "completed"
        assert any(h.get("events.nrows") == 1 for h in history)  # the events table
        seen[run["display_name"]] = config["arm"]
    assert seen == {"a-s0": "a", "b-s0": "b"}


def test_unknown_target_and_missing_store(experiment, tmp_path):
    with pytest.raises(UserError, match="unknown export target"):
        export(experiment, "excel")
    with pytest.raises(UserError, match=r"lmlab\.sqlite missing"):
        export(tmp_path / "nowhere", "tensorboard")
