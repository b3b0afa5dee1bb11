"""One run of a sweep, or one pack of runs, in its own process:
``python -m lmlab.execute.worker OUT_DIR RUN_ID [RUN_ID ...]`` (several: one packed run,
``lmlab.train.pack``).

The runs' resolved configs are read from the store (the parent wrote them), so a worker needs
nothing else. Before it touches the store it takes each run's lease (``runs/<run_id>/lease.json``):
a run never has two workers, whichever executor started them. A worker a local driver started dies with
it (``--driver-pid``: the kernel's parent-death signal on Linux), and any worker stops when the
directory lock stops naming its driver (``--driver-token``): at its next step boundary, with a
checkpoint, and at the latest ``ORPHAN_GRACE_S`` later.

Exit status: 0 when every run reached a terminal state (completed, diverged, over_budget), 130
when interrupted, 2 on a user error (the runs not yet ended are marked failed, the message is the
last line of stderr), 1 on a crash (marked failed too), ``EXIT_BUSY`` when another live worker
holds a run (nothing is written), ``EXIT_ORPHANED`` when the driver died.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
from pathlib import Path

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.lease import (
    EXIT_BUSY,
    EXIT_ORPHANED,
    ORPHAN_GRACE_S,
    RUN_LEASE_WAIT_S,
    Lease,
    LeaseHeld,
    die_with_parent,
    exit_after,
    watch_driver,
)
from lmlab.execute.local import memory_rule, stop_on_signals
from lmlab.names import LEASE_FILE, LOCK_FILE, RUNS_DIR, Status
from lmlab.store import Store
from lmlab.train import distributed
from lmlab.train.distributed import NullSink
from lmlab.train.loop import train
from lmlab.train.pack import Member, train_pack
from lmlab.train.samples import sample_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab.execute.worker")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("run_ids", nargs="+", metavar="run_id")
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--driver-pid", type=int, default=None,
                        help="the local driver that started this worker: die with it")
    parser.add_argument("--driver-token", default=None,
                        help="the token of the driver's directory lock: stop when it changes")
    args = parser.parse_args(argv)
    ranked = distributed.launched()  # one rank of a run torchrun launched over several devices
    if ranked:  # the ranks' parent is torchrun's agent: the driver is watched through its lock
        args.driver_pid = None
    if args.driver_pid is not None and not die_with_parent(args.driver_pid):
        print("error: the driver that started this worker is gone", file=sys.stderr)
        return EXIT_ORPHANED

    leases: list[Lease] = []
    try:
        for run_id in args.run_ids if int(os.environ.get("RANK", 0)) == 0 else ():
            lease = Lease(args.out_dir / RUNS_DIR / run_id / LEASE_FILE,
                          command=f"worker of run {run_id}")
            try:
                lease.acquire(wait_s=RUN_LEASE_WAIT_S)
            except LeaseHeld as e:
                # The driver names the run(s) this worker was started for.
                print(f"error: already has a live worker, {e.holder.describe()}, that did not "
                      f"stop within {RUN_LEASE_WAIT_S:.0f} s; stop it (kill {e.holder.pid} on "
                      f"{e.holder.host}) and rerun", file=sys.stderr)
                return EXIT_BUSY
            leases.append(lease)
            lease.keep_renewed()
        os.environ.update(memory_rule(args.out_dir))  # the addendum's allocator rule
        with stop_on_signals() as stop:
            orphaned = _stop_when_orphaned(args, stop, leases)
            code = _run(args, stop) if len(args.run_ids) == 1 else _run_pack(args, stop)
        return EXIT_ORPHANED if orphaned.is_set() else code
    finally:
        for lease in leases:
            lease.release()


def _stop_when_orphaned(args: argparse.Namespace, stop: threading.Event,
                        leases: list[Lease]) -> threading.Event:
    """Stop the runs when their driver is gone, or when a run's lease is (set aside by another
    host that judged this one dead): at the next step boundary, and at the latest after the
    grace period."""
    orphaned = threading.Event()

    def gone(why: str) -> None:
        print(f"stopping: {why}", file=sys.stderr)
        orphaned.set()
        stop.set()
        exit_after(ORPHAN_GRACE_S)

    if args.driver_token is not None or args.driver_pid is not None:
        watch_driver(gone, lock=args.out_dir / LOCK_FILE, token=args.driver_token,
                     parent_pid=args.driver_pid)

    def lost(lease: Lease) -> None:
        lease.lost.wait()
        gone(f"its lease {lease.path} was taken over")

    for lease in leases:
        threading.Thread(target=lost, args=(lease,), name="lease lost", daemon=True).start()
    return orphaned


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    (run_id,) = args.run_ids
    try:
        with Store.open(args.out_dir) as store:
            row = store.run(run_id)
            if row is None:
                raise UserError(f"no run {run_id} in {args.out_dir}")
            cfg = RunConfig.model_validate(row["config"])
            rank = distributed.init(cfg)  # None unless torchrun launched this process
            # Rank 0 records the run (its lease is rank 0's); the other ranks only train.
            records = store if rank is None or rank.records else NullSink(run_id)
            mark = store.set_status if rank is None or rank.records else _nothing
            try:
                result = train(cfg, run_id, records, args.out_dir / RUNS_DIR / run_id,
                               base=args.base, should_stop=stop.is_set)
            except UserError as e:
                mark(run_id, Status.FAILED, error=str(e))
                raise
            except KeyboardInterrupt:
                mark(run_id, Status.INTERRUPTED)
                return 130
            except BaseException as e:
                mark(run_id, Status.FAILED, error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
                return 1
            finally:
                distributed.shutdown()
            if rank is None or rank.records:  # rank 0 alone: one process decodes
                _samples(store, [(run_id, cfg, result.status)], args, stop)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result.status == Status.INTERRUPTED else 0


def _samples(store: Store, runs: list[tuple[str, RunConfig, str]], args: argparse.Namespace,
             stop: threading.Event) -> None:
    """Each completed run's text samples, after training has returned (never inside it). A run
    is complete without them: a failure here is said in the worker's log, not in its status."""
    for run_id, cfg, status in runs:
        if status != Status.COMPLETED or stop.is_set():
            continue
        try:
            sample_run(cfg, run_id, store, args.out_dir / RUNS_DIR / run_id, base=args.base)
        except Exception as e:
            print(f"warning: run {run_id}: no samples ({type(e).__name__}: {e})",
                  file=sys.stderr)


def _run_pack(args: argparse.Namespace, stop: threading.Event) -> int:
    """The runs as one pack (``lmlab.train.pack.train_pack``): each member keeps its own record;
    on an error every member not yet ended is marked (one that completed keeps its status)."""
    try:
        with Store.open(args.out_dir) as store:
            members = []
            for run_id in args.run_ids:
                row = store.run(run_id)
                if row is None:
                    raise UserError(f"no run {run_id} in {args.out_dir}")
                members.append(Member(run_id, RunConfig.model_validate(row["config"]),
                                      args.out_dir / RUNS_DIR / run_id))
            try:
                results = train_pack(members, store, base=args.base, should_stop=stop.is_set)
            except UserError as e:
                _mark_unended(store, args.run_ids, Status.FAILED, str(e))
                raise
            except KeyboardInterrupt:
                _mark_unended(store, args.run_ids, Status.INTERRUPTED)
                return 130
            except BaseException as e:
                _mark_unended(store, args.run_ids, Status.FAILED, f"{type(e).__name__}: {e}")
                traceback.print_exc()
                return 1
            _samples(store, [(m.run_id, m.cfg, r.status) for m, r in zip(members, results,
                                                                          strict=True)],
                     args, stop)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if any(r.status == Status.INTERRUPTED for r in results) else 0


def _nothing(*_args: object, **_kwargs: object) -> None:
    """What a rank other than 0 writes when its run ends: nothing (rank 0 says it)."""


def _mark_unended(store: Store, run_ids: list[str], status: Status,
                  error: str | None = None) -> None:
    for run_id in run_ids:
        if (store.run(run_id) or {}).get("status") in (Status.PENDING, Status.RUNNING):
            store.set_status(run_id, status, error=error)


if __name__ == "__main__":
    sys.exit(main())
