"""On a CPU machine, is it faster to run two runs at a time or one after another?

    python benchmarks/parallel_cpu.py [SPEC]

Runs the same plan (default: examples/quickstart.yaml without preflight) once with one worker at a
time and once with two concurrent workers, and prints the total wall-clock of each. The local
executor's default (one at a time on CPU) follows this measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lmlab.errors import UserError
from lmlab.execute.experiment import open_experiment, prepare_plan_data
from lmlab.execute.local import run_sweep
from lmlab.spec.expand import expand, load_plan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="examples/quickstart.yaml")
    args = ap.parse_args()
    plan = load_plan(args.spec)
    try:
        prepare_plan_data(plan)
    except UserError:
        corpus = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"
        spec = plan.spec.model_copy(deep=True)
        spec.controlled.data = type(spec.controlled.data)(dataset="local", path=str(corpus))
        plan = expand(spec, plan.doc)
        prepare_plan_data(plan)
    totals = {}
    for parallel in (1, 2, 1, 2):  # interleaved
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "exp"
            open_experiment(plan, out)
            t0 = time.perf_counter()
            run_sweep(plan.runs, out, base=plan.base, parallel=parallel)
            totals.setdefault(parallel, []).append(time.perf_counter() - t0)
            print(f"{parallel} at a time: {totals[parallel][-1]:.1f} s for {len(plan.runs)} runs")
    best = {k: min(v) for k, v in totals.items()}
    print(f"best: sequential {best[1]:.1f} s, two at a time {best[2]:.1f} s "
          f"(two at a time / sequential = {best[2] / best[1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
