"""MLflow: one MLflow run per lmlab run, in an experiment named after the spec.

By default the runs go to a SQLite tracking store in ``dest`` (``dest/mlflow.db``, artifacts in
``dest/artifacts``): MLflow's own recommended local backend, with no server to run
(``mlflow ui --backend-store-uri sqlite:///DEST/mlflow.db`` shows it, with the full ``mlflow``
package). ``MLFLOW_TRACKING_URI`` sends them anywhere else (a tracking server, another database).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmlab.export import RunExport, require
from lmlab.names import Status

_BATCH = 1000  # MLflow's log_batch limit on metrics per call
DB_FILE = "mlflow.db"


def tracking_uri(dest: Path) -> str:
    """Where ``write`` sends the runs: ``MLFLOW_TRACKING_URI``, or the SQLite store in ``dest``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(dest / DB_FILE).resolve()}"


def write(name: str, runs: list[RunExport], dest: Path) -> Path | str:
    require("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(dest)
    artifacts = None
    if uri.startswith("sqlite:") and "MLFLOW_TRACKING_URI" not in os.environ:
        dest.mkdir(parents=True, exist_ok=True)
        # Beside the database, not MLflow's default ./mlruns in whatever the current directory is.
        artifacts = (dest / "artifacts").resolve().as_uri()
    # A file store cannot hold both "grad_norm" and "grad_norm/block.0" (one would be a file,
    # the other a folder): there, slashes become dots. Databases and servers keep lmlab's names.
    file_store = uri.startswith("file:") or "://" not in uri

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else \
        client.create_experiment(name, artifact_location=artifacts)
    for run in runs:
        mlrun = client.create_run(experiment_id, run_name=run.run_id,
                                  tags={"lmlab.arm": run.arm, "lmlab.seed": str(run.seed),
                                        "lmlab.status": run.status})
        rid = mlrun.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        now = int(time.time() * 1000)
        metrics = [Metric(metric.replace("/", ".") if file_store else metric, float(value), now,
                          step)
                   for step, values in run.by_step.items() for metric, value in values.items()]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(rid, metrics=metrics[i:i + _BATCH])
        client.log_dict(rid, {"events": run.events, "summary": run.summary}, "lmlab_run.json")
        client.set_terminated(rid, status="FINISHED" if run.status == Status.COMPLETED else "FAILED")
    return uri
