"""``lmlab run --executor slurm``: each unit (a run, or a pack) is one submitit job.

The Slurm parameters are a thin layer over submitit's (``slurm_*`` in
``submitit.AutoExecutor.update_parameters``), from the spec's ``execution.slurm`` or the command
line: partition, time limit, account, QoS, memory, and the placement ``controlled.hardware``
asks for, as ``--constraint=<hardware>`` (the usual way sites name GPU types as node features) or,
with ``gres_type``, ``--gres=gpu:<type>:<n>``. Anything else goes through ``additional`` (sbatch
options submitit passes on as they are).

submitit's job folder is ``STORAGE/submitit``; the job ids are recorded in the store, so a
driver that is stopped and started again adopts the jobs still queued or running instead of
submitting them twice. A job Slurm signals before its time limit or a preemption is requeued
(submitit's checkpoint hook) and resumes from its last checkpoint. Slurm cannot run on the
machine lmlab is tested on: the same jobs go through submitit's local executor there
(``cluster="local"``), which runs each as a process of this host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import UserError
from lmlab.execute.lease import read_holder
from lmlab.execute.pack import Pack
from lmlab.execute.remote import UnitJob, for_ranks, train_unit, unit_outcome
from lmlab.names import LEASE_FILE, RUNS_DIR

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # the executor says so when it is asked for
    submitit = None
    Checkpointable = object

# Job states in which a job is still Slurm's to run (sacct's names).
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
               "SUSPENDED"}
GENERIC = ("any", "", "cpu", "cuda")


class SlurmUnit(Checkpointable):  # type: ignore[misc, valid-type]
    """The job's callable: trains the unit; on Slurm's timeout or preemption signal, submitit
    calls :meth:`checkpoint` and requeues the same unit, which resumes from its checkpoint."""

    def __call__(self, job: UnitJob) -> dict[str, Any]:
        return train_unit(job)

    def checkpoint(self, job: UnitJob) -> Any:
        return DelayedSubmission(self, job)


def slurm_parameters(options: dict[str, Any], *, cpus: float, gpus: float | None,
                     hardware: str) -> dict[str, Any]:
    """submitit's parameters for one unit's job from lmlab's few options."""
    wants_gpu = hardware not in ("any", "", "cpu")
    n_gpus = int(gpus if gpus is not None else (1 if wants_gpu else 0))
    params: dict[str, Any] = {"timeout_min": int(options.get("time_min") or 60),
                              "cpus_per_task": max(1, int(cpus)), "tasks_per_node": 1,
                              "nodes": 1}
    for ours, theirs in (("partition", "slurm_partition"), ("account", "slurm_account"),
                         ("qos", "slurm_qos"), ("mem_gb", "mem_gb")):
        if options.get(ours) is not None:
            params[theirs] = options[ours]
    additional = dict(options.get("additional") or {})
    gres_type = options.get("gres_type")
    if n_gpus and gres_type:
        params["slurm_gres"] = f"gpu:{gres_type}:{n_gpus}"
    elif n_gpus:
        params["gpus_per_node"] = n_gpus
    if hardware not in GENERIC and not gres_type:
        params["slurm_constraint"] = options.get("constraint") or hardware
    elif options.get("constraint"):
        params["slurm_constraint"] = options["constraint"]
    if additional:
        params["slurm_additional_parameters"] = additional
    return params


class SlurmBackend:
    name = "slurm"

    def __init__(self, storage: Path, options: dict[str, Any], *, cpus: float = 1.0,
                 gpus: float | None = None, hardware: str = "any",
                 cluster: str | None = None) -> None:
        if submitit is None:
            raise UserError("the Slurm executor needs submitit: pip install 'lmlab[slurm]'",
                            field="--executor")
        self.storage = storage
        self.folder = storage / "submitit"
        self.cluster = cluster or options.get("cluster") or "slurm"
        if self.cluster == "slurm" and submitit.SlurmExecutor.affinity() < 0:
            raise UserError("--executor slurm: no Slurm here (sbatch not found); run the driver "
                            "where jobs can be submitted, or set execution.slurm.cluster: local "
                            "to run the jobs on this machine", field="--executor")
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        self.options, self.cpus, self.gpus, self.hardware = options, cpus, gpus, hardware

    def submit(self, unit: Pack, job: UnitJob) -> Any:
        wants_gpu = self.hardware not in ("any", "", "cpu")
        gpus = self.gpus if self.gpus is not None else (1 if wants_gpu else 0)
        cpus, gpus = for_ranks(unit, self.cpus, gpus)
        params = slurm_parameters(self.options, cpus=cpus, gpus=gpus, hardware=self.hardware)
        if self.executor.cluster != "slurm":  # the local executor knows none of Slurm's
            params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node")}
        self.executor.update_parameters(name="lmlab", **params)
        return self.executor.submit(SlurmUnit(), job)

    def adopt(self, record: dict[str, Any]) -> Any | None:
        """A job a previous driver submitted, if it is still queued or running."""
        if record.get("executor") != self.name or record.get("cluster") != self.executor.cluster:
            return None
        if self.executor.cluster == "slurm":
            job = submitit.SlurmJob(self.folder, record["job_id"])
            return job if job.state in LIVE_STATES else None
        # A local job's process belonged to the old driver: it is alive while it holds a lease.
        leases = [self.storage / RUNS_DIR / rid / LEASE_FILE for rid in record["runs"]]
        if any((h := read_holder(p)) is not None and h.alive() for p in leases):
            return _Adopted(submitit.local.local.LocalJob(self.folder, record["job_id"]), leases)
        return None

    def done(self, handle: Any) -> bool:
        return handle.done()

    def error(self, handle: Any) -> tuple[str | None, bool]:
        try:
            return unit_outcome(handle.result(), None)
        except Exception as e:  # the job crashed: submitit's message holds its traceback
            return unit_outcome(None, e)

    def record(self, handle: Any) -> dict[str, Any]:
        job = handle.job if isinstance(handle, _Adopted) else handle
        return {"executor": self.name, "cluster": self.executor.cluster, "job_id": job.job_id}


class _Adopted:
    """A local job started by a driver that died: done when it wrote its result or no longer
    holds any of its runs' leases."""

    def __init__(self, job: Any, leases: list[Path]) -> None:
        self.job, self.leases = job, leases

    def done(self) -> bool:
        if self.job.paths.result_pickle.exists():
            return True
        return not any((h := read_holder(p)) is not None and h.alive() for p in self.leases)

    def result(self) -> Any:
        return self.job.result() if self.job.paths.result_pickle.exists() else None
