"""One run of a sweep, in its own process: ``python -m lmlab.execute.worker OUT_DIR RUN_ID``.

The run's resolved config is read from the store (the parent wrote it), so a worker needs nothing
else. Before it touches the store it takes the run's lease (``runs/<run_id>/lease.json``): a run
never has two workers, whichever executor started them. A worker a local driver started dies with
it (``--driver-pid``: the kernel's parent-death signal on Linux), and any worker stops when the
directory lock stops naming its driver (``--driver-token``): at its next step boundary, with a
checkpoint, and at the latest ``ORPHAN_GRACE_S`` later.

Exit status: 0 when the run reached a terminal state (completed, diverged, over_budget), 130
when interrupted, 2 on a user error (the run is marked failed, the message is the last line of
stderr), 1 on a crash (marked failed too), ``EXIT_BUSY`` when another live worker holds the run
(nothing is written), ``EXIT_ORPHANED`` when the driver died.
"""

from __future__ import annotations

import argparse
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
from lmlab.execute.local import stop_on_signals
from lmlab.names import LEASE_FILE, LOCK_FILE, RUNS_DIR, Status
from lmlab.store import Store
from lmlab.train.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab.execute.worker")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("run_id")
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--driver-pid", type=int, default=None,
                        help="the local driver that started this worker: die with it")
    parser.add_argument("--driver-token", default=None,
                        help="the token of the driver's directory lock: stop when it changes")
    args = parser.parse_args(argv)
    if args.driver_pid is not None and not die_with_parent(args.driver_pid):
        print("error: the driver that started this worker is gone", file=sys.stderr)
        return EXIT_ORPHANED

    lease = Lease(args.out_dir / RUNS_DIR / args.run_id / LEASE_FILE,
                  command=f"worker of run {args.run_id}")
    try:
        lease.acquire(wait_s=RUN_LEASE_WAIT_S)
    except LeaseHeld as e:
        print(f"error: already has a live worker, {e.holder.describe()}, that did not stop "
              f"within {RUN_LEASE_WAIT_S:.0f} s; stop it (kill {e.holder.pid} on "
              f"{e.holder.host}) and rerun", file=sys.stderr)
        return EXIT_BUSY
    lease.keep_renewed()
    try:
        with stop_on_signals() as stop:
            orphaned = _stop_when_orphaned(args, stop, lease)
            code = _run(args, stop)
        return EXIT_ORPHANED if orphaned.is_set() else code
    finally:
        lease.release()


def _stop_when_orphaned(args: argparse.Namespace, stop: threading.Event,
                        lease: Lease) -> threading.Event:
    """Stop the run when its driver is gone, or when the run's lease is (set aside by another
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

    def lost() -> None:
        lease.lost.wait()
        gone(f"its lease {lease.path} was taken over")

    threading.Thread(target=lost, name="lease lost", daemon=True).start()
    return orphaned


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    try:
        with Store.open(args.out_dir) as store:
            row = store.run(args.run_id)
            if row is None:
                raise UserError(f"no run {args.run_id} in {args.out_dir}")
            cfg = RunConfig.model_validate(row["config"])
            try:
                result = train(cfg, args.run_id, store, args.out_dir / RUNS_DIR / args.run_id,
                               base=args.base, should_stop=stop.is_set)
            except UserError as e:
                store.set_status(args.run_id, Status.FAILED, error=str(e))
                raise
            except KeyboardInterrupt:
                store.set_status(args.run_id, Status.INTERRUPTED)
                return 130
            except BaseException as e:
                store.set_status(args.run_id, Status.FAILED, error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
                return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result.status == Status.INTERRUPTED else 0


if __name__ == "__main__":
    sys.exit(main())
