"""One run of a sweep, in its own process: ``python -m lmlab.execute.worker OUT_DIR RUN_ID``.

The run's resolved config is read from the store (the parent wrote it), so a worker needs nothing
else. Exit status: 0 when the run reached a terminal state (completed, diverged, over_budget),
130 when interrupted, 2 on a user error, 1 on a crash (the run is marked failed either way).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.local import stop_on_signals
from lmlab.names import RUNS_DIR, Status
from lmlab.store import Store
from lmlab.train.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab.execute.worker")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("run_id")
    parser.add_argument("--base", type=Path, default=None)
    args = parser.parse_args(argv)
    with Store.open(args.out_dir) as store:
        row = store.run(args.run_id)
        if row is None:
            print(f"no run {args.run_id} in {args.out_dir}", file=sys.stderr)
            return 2
        cfg = RunConfig.model_validate(row["config"])
        try:
            with stop_on_signals() as stop:
                result = train(cfg, args.run_id, store, args.out_dir / RUNS_DIR / args.run_id,
                               base=args.base, should_stop=stop.is_set)
        except UserError as e:
            store.set_status(args.run_id, Status.FAILED, error=str(e))
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            store.set_status(args.run_id, Status.INTERRUPTED)
            return 130
        except BaseException as e:
            store.set_status(args.run_id, Status.FAILED, error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return 1
    return 130 if result.status == Status.INTERRUPTED else 0


if __name__ == "__main__":
    sys.exit(main())
