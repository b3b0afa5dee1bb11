"""`lmlab plan`'s expected wall-clock against what the runs then take on the same machine.

    python benchmarks/plan_estimate.py [SPEC] [--fallback-corpus DIR]

Estimates every run of SPEC (default: examples/quickstart.yaml) the way `lmlab plan` does, then
runs each one alone as `lmlab run` would (its own worker process) and prints estimate, actual and
their ratio. The target is every ratio within 0.75-1.25.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lmlab.errors import UserError
from lmlab.execute.experiment import estimate, open_experiment, prepare_plan_data
from lmlab.execute.local import run_sweep
from lmlab.spec.expand import expand, load_plan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="examples/quickstart.yaml")
    default_fallback = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"
    ap.add_argument("--fallback-corpus", type=Path, default=default_fallback)
    args = ap.parse_args()
    plan = load_plan(args.spec)
    try:
        data = prepare_plan_data(plan)
    except UserError:  # no WikiText-2 here: the same design on the local corpus
        spec = plan.spec.model_copy(deep=True)
        spec.controlled.data = type(spec.controlled.data)(dataset="local", path=str(args.fallback_corpus))
        plan = expand(spec, plan.doc)
        data = prepare_plan_data(plan)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "exp"
        open_experiment(plan, out)
        t0 = time.perf_counter()
        record = estimate(plan, out, data)
        print(f"estimating took {time.perf_counter() - t0:.1f} s")
        ratios = []
        for run, planned in zip(plan.runs, record["runs"], strict=True):
            t0 = time.perf_counter()
            run_sweep([run], out, base=plan.base)
            actual = time.perf_counter() - t0
            ratio = planned["estimate_s"] / actual
            ratios.append(ratio)
            print(f"{run.run_id:24s} estimate {planned['estimate_s']:7.1f} s   actual "
                  f"{actual:7.1f} s   estimate/actual {ratio:.2f}")
    inside = sum(0.75 <= r <= 1.25 for r in ratios)
    print(f"{inside}/{len(ratios)} runs within ±25%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
