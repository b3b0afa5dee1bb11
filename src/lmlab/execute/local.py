"""Local execution: one run in this process (``lmlab train``) or a sweep with one process per
run (``lmlab run``).

A sweep runs each (arm, seed) in its own process, so a crash, an out-of-memory error or a
diverged run never takes the others down, and every run starts from a clean allocator and RNG.
With GPUs, one run per GPU at a time. On CPU, runs go one after another with all cores by
default. Measured on 2 cores (benchmarks/parallel_cpu.py, the quickstart's 4 runs): two at a time
with one thread each took 66 s against 81 s in sequence, but then every run's step time and
tokens/sec depend on what runs beside it, and speed is one of the template's metrics; so
sequential stays the default and ``--parallel 2`` is there when speed is not the question.
Progress is read back from the store, which each worker writes once per log interval.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.estimate import check_memory
from lmlab.execute.lease import EXIT_BUSY, RUN_LEASE_WAIT_S, Lease, hold_directory
from lmlab.execute.pack import Pack, worker_command
from lmlab.execute.pack import command as unit_command
from lmlab.execute.progress import ProgressDisplay, make_progress
from lmlab.identity import same
from lmlab.names import (
    FINISHED,
    LEASE_FILE,
    RESULT_SPEC,
    RUNS_DIR,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    Status,
)
from lmlab.spec.expand import PlannedRun, addendum_requested
from lmlab.spec.schema import Spec
from lmlab.store import Store
from lmlab.train.loop import LogLine, RunResult, train
from lmlab.train.memory import KEEP_FREED_ENV
from lmlab.train.samples import sample_run

console = Console(stderr=True)
TICKS = 1000  # progress bars count thousandths of a run's budget


def memory_rule(out_dir: Path) -> dict[str, str]:
    """The environment a worker of this experiment needs: when it asks for the Memory / Systems
    addendum, its runs keep the allocator's defaults (``lmlab.train.memory``), so their peaks
    are the ones glibc gives, on this host or a cluster's."""
    with Store.open(out_dir) as store:
        stored = store.get_result(RESULT_SPEC)
    measured = stored is not None and addendum_requested(Spec.model_validate(stored["spec"]))
    return {KEEP_FREED_ENV: "0"} if measured else {}


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C / SIGTERM ask the run to stop at the next step boundary (checkpoint, mark
    interrupted, keep everything written) instead of killing it mid-write."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: the user insists
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        stop.set()
        console.print("[yellow]stopping at the next step boundary (Ctrl-C again to force)[/]")

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _progress() -> ProgressDisplay:
    return make_progress(console)


def run_single(cfg: RunConfig, out_dir: Path, run_id: str, *, base: Path | None = None,
               arm: str = "run") -> RunResult:
    """Train one configuration in this process, with a progress bar. Holds the directory's lock
    and the run's lease throughout."""
    check_memory(cfg)
    if cfg.train.distributed.nproc > 1:
        return _run_ranks(cfg, out_dir, run_id, base, arm)
    lease = Lease(out_dir / RUNS_DIR / run_id / LEASE_FILE, command=f"lmlab train, run {run_id}")
    with hold_directory(out_dir), _holding(lease), Store.open(out_dir) as store, \
            stop_on_signals() as stop, _progress() as progress:
        store.check_intact()
        existing = store.run(run_id)
        if existing is not None and not same(existing["config"], cfg):
            raise UserError(f"{out_dir} already holds run {run_id} of a different config: its "
                            "results stay; train this one with another --out")
        if existing is not None and existing["status"] == Status.COMPLETED:  # nothing left to do
            return RunResult(run_id, Status.COMPLETED, existing.get("summary") or {})
        store.add_run(run_id, arm, cfg.train.seed, cfg.to_json(), cfg.config_hash)
        task = progress.add_task(run_id, total=TICKS, info="")

        def on_log(line: LogLine) -> None:
            info = f"{line.tokens:,} tok  loss {line.train_loss:.3f}  {line.tokens_per_s:,.0f} tok/s"
            if line.val_loss is not None:
                info += f"  val {line.val_loss:.3f}"
            progress.update(task, completed=int(line.progress * TICKS), info=info)

        try:
            result = train(cfg, run_id, store, out_dir / RUNS_DIR / run_id, base=base,
                           on_log=on_log, should_stop=stop.is_set)
        except KeyboardInterrupt:
            store.set_status(run_id, Status.INTERRUPTED)
            raise
        except Exception as e:
            store.set_status(run_id, Status.FAILED, error=f"{type(e).__name__}: {e}")
            raise
        if result.status == Status.COMPLETED and not stop.is_set():  # after training, never in it
            try:
                sample_run(cfg, run_id, store, out_dir / RUNS_DIR / run_id, base=base)
            except Exception as e:
                print(f"warning: run {run_id}: no samples ({type(e).__name__}: {e})",
                      file=sys.stderr)
        return result


def _run_ranks(cfg: RunConfig, out_dir: Path, run_id: str, base: Path | None,
               arm: str) -> RunResult:
    """``lmlab train`` of a run over several devices: torchrun starts its ranks (the worker,
    ``train.distributed.nproc`` times; rank 0 holds the run's lease and records), this process
    waits, holding the directory's lock, and passes Ctrl-C on."""
    with hold_directory(out_dir) as lock, Store.open(out_dir) as store, \
            stop_on_signals() as stop:
        store.check_intact()
        existing = store.run(run_id)
        if existing is not None and not same(existing["config"], cfg):
            raise UserError(f"{out_dir} already holds run {run_id} of a different config: its "
                            "results stay; train this one with another --out")
        store.add_run(run_id, arm, cfg.train.seed, cfg.to_json(), cfg.config_hash)
        cmd = worker_command([run_id], cfg.train.distributed.nproc, out_dir, base,
                             driver_token=lock.token)
        log = out_dir / RUNS_DIR / run_id / "worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as stderr:
            proc = subprocess.Popen(cmd, stderr=stderr, start_new_session=True)
        while proc.poll() is None:
            if stop.is_set():
                proc.send_signal(signal.SIGINT)  # the agent passes it to every rank
            time.sleep(0.2)
        row = store.run(run_id) or {}
        if proc.returncode == 2:
            raise UserError(_last_error(log.read_text(errors="replace")))
        if row.get("status") in (Status.RUNNING, Status.PENDING):
            store.set_status(run_id, Status.FAILED, error=log.read_text(errors="replace")[-4000:])
            row = store.run(run_id) or {}
        return RunResult(run_id, row.get("status", Status.FAILED), row.get("summary") or {})


@contextmanager
def _holding(lease: Lease) -> Iterator[Lease]:
    """A run's lease, waiting a little for a worker of a killed driver to stop first."""
    lease.acquire(wait_s=RUN_LEASE_WAIT_S)
    lease.keep_renewed()
    try:
        yield lease
    finally:
        lease.release()


def _devices() -> list[str | None]:
    """Slots for concurrent runs: one per GPU, or a single CPU slot."""
    n = torch.cuda.device_count()
    return [str(i) for i in range(n)] if n else [None]


def run_sweep(runs: list[PlannedRun], out_dir: Path, *, base: Path | None = None,
              parallel: int | None = None,
              units: Callable[[list[PlannedRun]], list[Pack]] | None = None) -> dict[str, str]:
    """Run every planned run that is not completed yet, each in its own worker process, or, with
    ``units`` (``lmlab.execute.pack.plan_packs`` over the runs left to do), each pack of runs in
    one, holding the directory's lock. Returns {run_id: final status}; a run that stopped on an
    error the user can fix (or that another live worker holds) is a UserError once every other
    run is done."""
    with hold_directory(out_dir) as lock:
        return _run_sweep(runs, out_dir, lock, base=base, parallel=parallel, units=units)


def _run_sweep(runs: list[PlannedRun], out_dir: Path, lock: Lease, *, base: Path | None,
               parallel: int | None,
               units: Callable[[list[PlannedRun]], list[Pack]] | None) -> dict[str, str]:
    slots = _devices()
    if parallel:
        slots = (slots * parallel)[:parallel] if slots == [None] else slots[:parallel]
    todo: list[PlannedRun] = []
    with Store.open(out_dir) as store:
        for r in runs:
            store.add_run(r.run_id, r.arm, r.seed, r.config.to_json(), r.config.config_hash)
        done = {row["run_id"]: row["status"] for row in store.runs()}
    todo = [r for r in runs if done.get(r.run_id) not in FINISHED]
    results = {r.run_id: done[r.run_id] for r in runs if r not in todo}

    with stop_on_signals() as stop, _progress() as progress, Store.open(out_dir) as store:
        overall = progress.add_task("experiment", total=len(runs) * TICKS, info="")
        progress.update(overall, completed=len(results) * TICKS)
        # One worker process per unit: a run, or a pack of runs (its log is its first run's).
        active: dict[str, tuple[subprocess.Popen, dict[str, int], str | None]] = {}
        queue = units(todo) if units is not None else [Pack((r,)) for r in todo]
        free = list(slots)
        needs_you: dict[str, str] = {}  # run -> the error a user can fix, or the live worker
        while queue or active:
            if lock.lost.is_set() and not stop.is_set():  # another host judged this driver dead
                console.print(f"[red]{out_dir}: this driver's lock was taken over; stopping[/]")
                stop.set()
            while queue and free and not stop.is_set():
                unit = queue.pop(0)
                slot = free.pop(0)
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                elif len(slots) > 1:  # CPU runs side by side share the cores instead of fighting
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(slots)))
                # The worker dies with this process (Linux) and stops when the lock stops
                # naming it (anywhere): a rerun never races an orphan.
                cmd = unit_command(unit, out_dir, base, driver_token=lock.token)
                # stderr to a file, never a pipe: a chatty worker (compile logs) would block
                # on a full pipe that is only read when it exits.
                log = out_dir / RUNS_DIR / unit.run_ids[0] / "worker.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as stderr:
                    proc = subprocess.Popen(cmd, env=env, stderr=stderr, start_new_session=True)
                tasks = {rid: progress.add_task(rid, total=TICKS, info="starting")
                         for rid in unit.run_ids}
                active[unit.run_ids[0]] = (proc, tasks, slot)
            if stop.is_set() and not queue and not active:
                break
            if stop.is_set():
                queue.clear()
                for proc, _, _ in active.values():  # workers run in their own session
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            for first, (proc, tasks, slot) in list(active.items()):
                for run_id, task in tasks.items():
                    frac = _run_progress(store, run_id, runs)
                    progress.update(task, completed=int(frac * TICKS),
                                    info=_run_info(store, run_id))
                if proc.poll() is None:
                    continue
                stderr = (out_dir / RUNS_DIR / first / "worker.log").read_text(errors="replace")
                for run_id, task in tasks.items():
                    row = store.run(run_id) or {}
                    state = row.get("status", Status.FAILED)
                    if proc.returncode in (2, EXIT_BUSY):
                        needs_you[run_id] = _last_error(stderr)
                    # EXIT_BUSY: another live worker has the run, and its records are its own.
                    if proc.returncode not in (0, EXIT_BUSY) and \
                            state in (Status.RUNNING, Status.PENDING):
                        state = Status.INTERRUPTED if stop.is_set() else Status.FAILED
                        store.set_status(run_id, state, error=stderr[-4000:])
                    if state == Status.FAILED and run_id not in needs_you:
                        console.print(f"[red]{run_id} failed[/]\n{stderr[-2000:]}")
                    results[run_id] = state
                    progress.update(task, completed=TICKS, info=state)
                    progress.update(overall, advance=TICKS)
                del active[first]
                free.append(slot)
    for r in runs:
        results.setdefault(r.run_id, Status.PENDING)
    if needs_you:
        by_error: dict[str, list[str]] = {}
        for run_id, error in needs_you.items():
            by_error.setdefault(error, []).append(run_id)
        raise UserError("; ".join(f"run {', '.join(ids)}: {error}"
                                  for error, ids in by_error.items())
                        + f" (every other run went on: lmlab status {out_dir})")
    return results


def _last_error(worker_log: str) -> str:
    """The worker's own message: its last ``error: ...`` line."""
    lines = [ln for ln in worker_log.splitlines() if ln.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else worker_log.strip()[-500:]


def _run_progress(store: Store, run_id: str, runs: list[PlannedRun]) -> float:
    budget = next(r.config.budget for r in runs if r.run_id == run_id)
    rows = store.metrics(run_id, [TRAIN_LOSS]).get(TRAIN_LOSS, [])
    return budget.progress(*rows[-1][:3]) if rows else 0.0


def _run_info(store: Store, run_id: str) -> str:
    loss = store.last_metric(run_id, TRAIN_LOSS)
    tok_s = store.last_metric(run_id, TOKENS_PER_S)
    val = store.last_metric(run_id, VAL_LOSS)
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if val is not None:
        parts.append(f"val {val:.3f}")
    if tok_s is not None:
        parts.append(f"{tok_s:,.0f} tok/s")
    return "  ".join(parts)
