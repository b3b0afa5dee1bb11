"""Exports copy every run's config, metric rows (at their step), events and summary."""

from __future__ import annotations

import math

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


def test_tensorboard_export_holds_every_row(experiment, tmp_path):
    pytest.importorskip("tensorboard")
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


def test_mlflow_export(experiment, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = export(experiment, "mlflow", tmp_path / "ml")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a-s0", "b-s0"]
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert runs[0].data.params["optimizer.lr"] == str(RunConfig().optimizer.lr)


def test_unknown_target_and_missing_store(experiment, tmp_path):
    with pytest.raises(UserError, match="unknown export target"):
        export(experiment, "excel")
    with pytest.raises(UserError, match=r"lmlab\.sqlite missing"):
        export(tmp_path / "nowhere", "tensorboard")
