"""MLflow: one MLflow run per lmlab run, in an experiment named after the spec.

``dest`` as a local file store (no server, no database driver needed: it works with
``mlflow-skinny``) unless ``MLFLOW_TRACKING_URI`` points elsewhere;
``mlflow ui --backend-store-uri DEST`` shows it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmlab.export import RunExport, require
from lmlab.names import Status

_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def write(name: str, runs: list[RunExport], dest: Path) -> Path | str:
    require("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # MLflow 3 keeps the file store behind an opt-out; it is the one backend that needs
        # nothing installed beyond mlflow itself.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = dest.resolve().as_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    for run in runs:
        mlrun = client.create_run(experiment_id, run_name=run.run_id,
                                  tags={"lmlab.arm": run.arm, "lmlab.seed": str(run.seed),
                                        "lmlab.status": run.status})
        rid = mlrun.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        now = int(time.time() * 1000)
        # "grad_norm" and "grad_norm/block.0" cannot both exist in a file store (one would be a
        # file and a folder), so MLflow gets dots where lmlab has slashes.
        metrics = [Metric(metric.replace("/", "."), float(value), now, step)
                   for step, values in run.by_step.items() for metric, value in values.items()]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(rid, metrics=metrics[i:i + _BATCH])
        client.log_dict(rid, {"events": run.events, "summary": run.summary}, "lmlab_run.json")
        client.set_terminated(rid, status="FINISHED" if run.status == Status.COMPLETED else "FAILED")
    return uri
