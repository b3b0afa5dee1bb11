"""Sweeps on a cluster (``lmlab run --executor ray|slurm``): the same runs, trained by workers the
cluster places, their rows shipped to the driver.

The driver (the process running ``lmlab run``) stays the only writer of ``DIR/lmlab.sqlite``. A
remote worker never opens it: it gets its runs' configs with the job (:class:`UnitJob`), trains
them with :class:`~lmlab.store.ingest.Outbox` as their records, and keeps everything else under
the *storage* every node can reach (``--storage``, default the experiment directory):

    STORAGE/runs/<run_id>/checkpoint.pt    the run's checkpoints: a retry on any node resumes
    STORAGE/runs/<run_id>/lease.json       the one worker training it (lmlab.execute.lease)
    STORAGE/runs/<run_id>/outbox/*.json    its batches of rows, until the driver ingests them
    STORAGE/stop-<token>                   the driver asks its workers to stop (Ctrl-C)

The driver submits every unit (a run, or a pack of runs: one task or job each) to a
:class:`Backend`, then ingests the outboxes in order while they train
(:func:`lmlab.store.ingest.read_outbox`: each batch once, a superseded worker's refused). A
driver that was killed and is run again first ingests what its predecessor left, skips what is
finished, adopts the jobs still running (Slurm keeps them; Ray ends a dead driver's tasks) and
submits the rest, which resume from their checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.lease import RENEW_EVERY_S, TTL_S, Lease, hold_directory
from lmlab.execute.local import (
    TICKS,
    _progress,
    _run_info,
    _run_progress,
    memory_rule,
    stop_on_signals,
)
from lmlab.execute.pack import Pack
from lmlab.names import FINISHED, LEASE_FILE, RESULT_JOBS, RUNS_DIR, Status
from lmlab.spec.expand import PlannedRun
from lmlab.spec.schema import Execution
from lmlab.store import Store
from lmlab.store.ingest import REFUSED_DIR, Ingested, Outbox, read_outbox
from lmlab.train import distributed
from lmlab.train.checkpoint import set_aside_checkpoints
from lmlab.train.distributed import NullSink
from lmlab.train.loop import train
from lmlab.train.pack import Member, train_pack

# Data and cache locations the workers need, passed on from the driver's environment.
ENV_PASSED = ("LMLAB_DATA_DIR", "LMLAB_CACHE_DIR", "LMLAB_FALLBACK_CORPUS", "HF_HOME")
POLL_S = 0.5  # how often the driver ingests and looks at its jobs
STOP_CHECK_S = 1.0  # how often a worker looks for the driver's stop file


def hardware_problem(want: str) -> str | None:
    """Why this machine is not the ``controlled.hardware`` a spec asks for, or None."""
    if want in ("any", "", "cpu"):
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if (want == "cuda" and names) or any(want.lower() in n.lower() for n in names):
        return None
    return f"the spec expects '{want}' but this machine has {', '.join(names) or 'no GPU'}"


@dataclass(frozen=True)
class ExecutorOptions:
    """``lmlab run --executor ...`` and what goes with it (the spec's ``execution`` section,
    overridden by the command line)."""

    kind: Literal["local", "ray", "slurm"] = "local"
    address: str | None = None  # Ray: the cluster to join (None: start one on this machine)
    storage: Path | None = None  # checkpoints and outboxes (None: the experiment directory)
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None  # None: one when controlled.hardware is a GPU, else none
    max_retries: int = 3  # Ray: how often a unit whose worker died is started again
    slurm: dict[str, Any] = field(default_factory=dict)  # execution.slurm (slurm_backend)

    @property
    def remote(self) -> bool:
        return self.kind != "local"


def executor_options(execution: Execution, *, kind: str | None = None,
                     address: str | None = None, storage: Path | None = None,
                     cpus_per_run: float | None = None, gpus_per_run: float | None = None,
                     partition: str | None = None, time_min: int | None = None
                     ) -> ExecutorOptions:
    """The spec's ``execution`` section with the command line's overrides."""
    kind = kind or execution.executor
    if kind not in ("local", "ray", "slurm"):
        raise UserError(f"the executor is local, ray or slurm, not {kind!r}", field="--executor")
    if address is not None and kind != "ray":
        raise UserError("--address names a Ray cluster: it goes with --executor ray",
                        field="--address")
    if storage is not None and kind == "local":
        raise UserError("--storage is where a cluster's workers keep checkpoints and rows; the "
                        "local executor keeps them in the experiment directory (--out)",
                        field="--storage")
    slurm = execution.slurm.model_dump()
    slurm |= {k: v for k, v in (("partition", partition), ("time_min", time_min)) if v is not None}
    return ExecutorOptions(
        kind, address, storage,  # type: ignore[arg-type]
        cpus_per_run if cpus_per_run is not None else execution.cpus_per_run,
        gpus_per_run if gpus_per_run is not None else execution.gpus_per_run, slurm=slurm)


def backend_for(options: ExecutorOptions, storage: Path, hardware: str) -> Backend:
    """The cluster ``options`` name, connected."""
    if options.kind == "ray":
        from lmlab.execute.ray_backend import RayBackend

        return RayBackend(options.address, cpus=options.cpus_per_run, gpus=options.gpus_per_run,
                          hardware=hardware, max_retries=options.max_retries)
    from lmlab.execute.slurm_backend import SlurmBackend

    return SlurmBackend(storage, options.slurm, cpus=options.cpus_per_run,
                        gpus=options.gpus_per_run, hardware=hardware)


def for_ranks(unit: Pack, cpus: float, gpus: float) -> tuple[float, float]:
    """What one unit asks the cluster for, given what one run asks: a run over N devices
    (``train.distributed.nproc``) needs N times the GPUs and at least N CPUs."""
    n = unit.runs[0].config.train.distributed.nproc
    return (max(cpus, n), gpus * n) if n > 1 else (cpus, gpus)


# ---- the worker's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitJob:
    """Everything a remote worker needs to train one unit, and nothing it would read from the
    driver's store: the runs' ids and configs (JSON), where the storage is, and the stop file."""

    run_ids: tuple[str, ...]
    configs: tuple[str, ...]
    storage: str
    stop_file: str
    hardware: str = "any"
    base: str | None = None
    env: tuple[tuple[str, str], ...] = ()


def train_unit(job: UnitJob) -> dict[str, Any]:
    """Train one unit on whatever node runs this (a Ray task, a submitit job). Holds each run's
    lease under the storage: a retry waits out a dead worker's lease (``TTL_S`` on another
    host, at once on the same one) and resumes from the checkpoint. Returns ``{"statuses":
    {run_id: status}, "user_error": None}``, or the message of an error the user can fix (not
    raised: a cluster would retry it, and it would only happen again)."""
    try:
        return {"statuses": _train_unit(job), "user_error": None}
    except UserError as e:
        return {"statuses": {}, "user_error": str(e)}


def _train_unit(job: UnitJob) -> dict[str, str]:
    for key, value in job.env:
        os.environ.setdefault(key, value)
    problem = hardware_problem(job.hardware)
    if problem is not None:
        raise UserError(problem, field="controlled.hardware")
    first = RunConfig.model_validate_json(job.configs[0])
    if first.train.distributed.nproc > 1 and not distributed.launched():
        return _launch_ranks(job, first.train.distributed.nproc)
    rank = distributed.init(first)  # None unless this is one of torchrun's ranks
    storage = Path(job.storage)
    leases: list[Lease] = []
    try:
        for run_id in job.run_ids if rank is None or rank.records else ():
            lease = Lease(storage / RUNS_DIR / run_id / LEASE_FILE,
                          command=f"remote worker of run {run_id}")
            lease.acquire(wait_s=TTL_S + 2 * RENEW_EVERY_S)
            lease.keep_renewed()
            leases.append(lease)
        should_stop = _stop_check(Path(job.stop_file), leases)
        base = Path(job.base) if job.base else None
        cfgs = [RunConfig.model_validate_json(c) for c in job.configs]
        # A data-parallel run: rank 0 sends the rows, the other ranks only train.
        records = Outbox(storage) if rank is None or rank.records else NullSink(job.run_ids[0])
        if len(cfgs) == 1:
            results = [train(cfgs[0], job.run_ids[0], records,
                             storage / RUNS_DIR / job.run_ids[0], base=base,
                             should_stop=should_stop)]
        else:
            members = [Member(rid, cfg, storage / RUNS_DIR / rid)
                       for rid, cfg in zip(job.run_ids, cfgs, strict=True)]
            results = train_pack(members, Outbox(storage), base=base, should_stop=should_stop)
        return {r.run_id: str(r.status) for r in results}
    finally:
        for lease in leases:
            lease.release()
        distributed.shutdown()


def _launch_ranks(job: UnitJob, nproc: int) -> dict[str, str]:
    """A run over ``nproc`` devices inside one task or job: torchrun starts its ranks on this
    node (``python -m lmlab.execute.remote JOB_FILE``, each one :func:`_train_unit`), and the
    task waits for them. Its rows come from rank 0's outbox, so only the exit status is read."""
    (run_id,) = job.run_ids
    run_dir = Path(job.storage) / RUNS_DIR / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    job_file = run_dir / "job.json"
    job_file.write_text(json.dumps(asdict(job)))
    log = run_dir / "ranks.log"
    with open(log, "ab") as stderr:
        code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={nproc}", "-m", "lmlab.execute.remote",
                                str(job_file)], stderr=stderr)
    errors = [ln for ln in log.read_text(errors="replace").splitlines()
              if ln.startswith("error: ")]
    if code == 2 and errors:
        raise UserError(errors[-1].removeprefix("error: "))
    if code != 0:
        raise RuntimeError(f"torchrun ended with exit status {code}; see {log}")
    return {}


def _rank_main(job_file: str) -> int:
    """One rank of a data-parallel run inside a remote task (see :func:`_launch_ranks`)."""
    d = json.loads(Path(job_file).read_text())
    job = UnitJob(**{**d, "run_ids": tuple(d["run_ids"]), "configs": tuple(d["configs"]),
                     "env": tuple(tuple(kv) for kv in d["env"])})
    result = train_unit(job)
    if result["user_error"]:
        print(f"error: {result['user_error']}", file=sys.stderr)
        return 2
    return 0


def _stop_check(stop_file: Path, leases: list[Lease]) -> Callable[[], bool]:
    """A ``should_stop`` for the loop: the driver's stop file exists, or a lease was taken over
    (another worker has the run now). Looks at the file system at most every STOP_CHECK_S."""
    last = [0.0, False]
    mutex = threading.Lock()

    def should_stop() -> bool:
        with mutex:
            if any(lease.lost.is_set() for lease in leases):
                return True
            now = time.monotonic()
            if now - last[0] >= STOP_CHECK_S:
                last[0], last[1] = now, stop_file.exists()
            return bool(last[1])

    return should_stop


# ---- the driver's side ------------------------------------------------------------------------


class Backend(Protocol):
    """A cluster the driver hands units to (``execute.ray_backend``, ``execute.slurm_backend``)."""

    name: str

    def submit(self, unit: Pack, job: UnitJob) -> Any: ...
    def adopt(self, record: dict[str, Any]) -> Any | None: ...  # a job a dead driver started
    def done(self, handle: Any) -> bool: ...
    def error(self, handle: Any) -> tuple[str | None, bool]: ...  # (message, a user's error?)
    def record(self, handle: Any) -> dict[str, Any]: ...  # what adopt() needs later


def run_remote(runs: list[PlannedRun], out_dir: Path, backend: Backend, *, storage: Path,
               units: Callable[[list[PlannedRun]], list[Pack]], base: Path | None = None,
               hardware: str = "any") -> dict[str, str]:
    """Run every planned run not finished yet on ``backend``, holding the directory's lock and
    ingesting the workers' batches; returns {run_id: final status} like ``run_sweep``."""
    with hold_directory(out_dir) as lock:
        storage.mkdir(parents=True, exist_ok=True)
        stop_file = storage / f"stop-{lock.token}"
        try:
            return _run_remote(runs, out_dir, backend, storage, units, base, hardware, stop_file,
                               lock)
        finally:
            stop_file.unlink(missing_ok=True)


def _drain(store: Store, storage: Path, run_ids: list[str], *, final: bool = False,
           ) -> list[str]:
    """Ingest what the runs' workers sent; returns the runs one of whose batch files could not
    be read in this pass (set aside in its outbox's refused/, and said on stderr)."""
    damaged = []
    for run_id in run_ids:
        outbox = Outbox(storage).directory(run_id)
        if read_outbox(store, outbox, final=final)[Ingested.UNREADABLE]:
            damaged.append(run_id)
            print(f"warning: run {run_id}: a batch file of its records could not be read; it "
                  f"is kept in {outbox / REFUSED_DIR}", file=sys.stderr)
    return damaged


def _restart_damaged(store: Store, storage: Path, run_id: str, state: str) -> str:
    """A run with an unreadable batch: its rows since then are not all in the store, and a
    resume from its checkpoint would leave that gap. Its checkpoints are set aside (kept), so a
    rerun trains it again from the start; it ends failed (or interrupted), saying so."""
    run_dir = storage / RUNS_DIR / run_id
    moved = set_aside_checkpoints(run_dir, "a batch of the run's records could not be read")
    if state in FINISHED:
        state = Status.FAILED
    store.set_status(run_id, state, error=(
        f"a batch of its records could not be read (kept in {Outbox(storage).directory(run_id)}"
        f"/{REFUSED_DIR}); its checkpoints are set aside ({', '.join(m.moved_to for m in moved) or 'none'}"
        f") so that a rerun trains it again from the start and no row is missing"))
    return state


def _run_remote(runs: list[PlannedRun], out_dir: Path, backend: Backend, storage: Path,
                units: Callable[[list[PlannedRun]], list[Pack]], base: Path | None,
                hardware: str, stop_file: Path, lock: Lease) -> dict[str, str]:
    all_ids = [r.run_id for r in runs]
    with Store.open(out_dir) as store:
        for r in runs:
            store.add_run(r.run_id, r.arm, r.seed, r.config.to_json(), r.config.config_hash)
        # What a killed driver's workers sent after it died; a run with a batch that cannot be
        # read is trained again from the start when its job ends (_restart_damaged).
        damaged = set(_drain(store, storage, all_ids))
        done = {row["run_id"]: row["status"] for row in store.runs()}
        jobs: dict[str, Any] = store.get_result(RESULT_JOBS) or {}
    todo = [r for r in runs if done.get(r.run_id) not in FINISHED]
    results = {r.run_id: done[r.run_id] for r in runs if r not in todo}
    env = tuple((k, os.environ[k]) for k in ENV_PASSED if os.environ.get(k))
    env += tuple(memory_rule(out_dir).items())  # the addendum's allocator rule, on every node
    needs_you: dict[str, str] = {}

    with stop_on_signals() as stop, _progress() as progress, Store.open(out_dir) as store:
        overall = progress.add_task(f"experiment ({backend.name})", total=len(runs) * TICKS,
                                    info="")
        progress.update(overall, completed=len(results) * TICKS)
        active: dict[str, tuple[Any, Pack, dict[str, int]]] = {}
        for unit in units(todo):
            first = unit.run_ids[0]
            previous = jobs.get(first)
            handle = backend.adopt(previous) if previous and previous.get(
                "runs") == unit.run_ids else None
            if handle is None:
                job = UnitJob(tuple(unit.run_ids), tuple(r.config.to_json() for r in unit.runs),
                              str(storage), str(stop_file), hardware,
                              None if base is None else str(base), env)
                handle = backend.submit(unit, job)
            jobs[first] = {"runs": unit.run_ids, **backend.record(handle)}
            tasks = {rid: progress.add_task(rid, total=TICKS, info=f"{backend.name}: queued")
                     for rid in unit.run_ids}
            active[first] = (handle, unit, tasks)
        store.put_result(RESULT_JOBS, jobs)  # a restarted driver adopts what still runs

        while active:
            if lock.lost.is_set() and not stop.is_set():  # another host judged this driver dead
                stop.set()
            if stop.is_set() and not stop_file.exists():
                stop_file.touch()  # every worker checkpoints and stops at its next step
            time.sleep(POLL_S)
            damaged.update(_drain(store, storage,
                                  [rid for _, u, _ in active.values() for rid in u.run_ids]))
            for first, (handle, unit, tasks) in list(active.items()):
                for run_id, task in tasks.items():
                    progress.update(task, completed=int(_run_progress(store, run_id, runs) * TICKS),
                                    info=_run_info(store, run_id))
                if not backend.done(handle):
                    continue
                damaged.update(_drain(store, storage, unit.run_ids, final=True))  # its last
                error, users = backend.error(handle)
                for run_id, task in tasks.items():
                    state = (store.run(run_id) or {}).get("status", Status.FAILED)
                    if error is not None and users:
                        needs_you[run_id] = error
                    if state in (Status.RUNNING, Status.PENDING):
                        state = Status.INTERRUPTED if stop.is_set() else Status.FAILED
                        store.set_status(run_id, state, error=error or
                                         f"the {backend.name} job ended without finishing it")
                    if run_id in damaged:
                        state = _restart_damaged(store, storage, run_id, state)
                    results[run_id] = state
                    progress.update(task, completed=TICKS, info=state)
                    progress.update(overall, advance=TICKS)
                del active[first]
    for r in runs:
        results.setdefault(r.run_id, Status.PENDING)
    if needs_you:
        raise UserError("; ".join(f"run {rid}: {e}" for rid, e in needs_you.items())
                        + f" (every other run went on: lmlab status {out_dir})")
    return results


def unit_outcome(result: dict[str, Any] | None, crash: BaseException | None
                 ) -> tuple[str | None, bool]:
    """What a finished unit says, as :meth:`Backend.error` reports it: (message, whether the
    user can fix it); (None, False) when it ran to its end."""
    if crash is not None:
        return f"{type(crash).__name__}: {crash}"[-3000:], False
    if result and result.get("user_error"):
        return str(result["user_error"]), True
    return None, False


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
