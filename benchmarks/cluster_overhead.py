"""What running a sweep through Ray or submitit costs against the local executor.

    python benchmarks/cluster_overhead.py [--steps N] [--repeats R]

Runs one tiny spec (2 arms x 2 seeds on the test-articles corpus, no preflight) with
``lmlab run --executor local``, ``--executor ray`` (against a Ray head started here beforehand,
so the cluster's own start-up is timed once, separately) and ``--executor slurm`` through
submitit's local executor, each in a fresh experiment directory, interleaved, and prints each
path's wall-clock of the whole ``lmlab run`` and its ratio to the local executor's. The same
runs train in every path (the tests check their rows are identical), so the difference is the
executor: process start, task scheduling, outbox files and their ingestion. Read the rows with
their concurrency in mind: the local executor runs one run at a time on CPU (and times the plan
first), ``local -j2`` two at a time, the 2-CPU Ray cluster two tasks at a time in worker
processes it reuses, and submitit's local executor starts every job at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DATA = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"


def spec(steps: int, executor: dict | None) -> dict:
    out = {
        "meta": {"name": "overhead", "category": "hyperparam", "seeds": [0, 1]},
        "objective": "executor overhead", "hypothesis": {
            "mechanism": "-", "prediction": "-", "falsification": "-"},
        "controlled": {"data": {"dataset": "local", "path": str(DATA),
                                "name": "wikitext-2-test-articles"},
                       "tokenizer": {"kind": "bpe", "vocab_size": 512},
                       "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
                       "train": {"batch_size": 8, "seq_len": 32}},
        "independent": {"variables": ["optimizer.lr"],
                        "arms": {"slow": {"optimizer.lr": 1e-3}, "fast": {"optimizer.lr": 3e-3}}},
        "budget": {"tokens": 8 * 32 * steps}, "comparison_axis": "equal_tokens",
        "evaluation": {"every_steps": 6, "max_batches": 4, "test_at_end": False},
        "cadence": {"log_every_steps": 3, "checkpoint_every_steps": 4},
        "expected_outcomes": ["-"], "preflight": {"enabled": False},
    }
    if executor:
        out["execution"] = executor
    return out


def lmlab_run(spec_path: Path, out: Path, *args: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_PROGRESS": "off"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(spec_path), "--out",
                           str(out), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return seconds


def start_ray(temp: Path) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = temp / "ray.log"
    t0 = time.perf_counter()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
         f"--temp-dir=/tmp/lmlab-bench-ray-{os.getpid()}"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its "started" line, as it is printed
    while b"Ray runtime started" not in log.read_bytes():
        if head.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.2)
    return head, f"127.0.0.1:{port}", time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        paths = {}
        for name, executor in (("local", None), ("ray", None),
                               ("slurm", {"executor": "slurm",
                                          "slurm": {"cluster": "local", "time_min": 30}})):
            paths[name] = tmp / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump(spec(args.steps, executor), sort_keys=False))
        head, address, startup = start_ray(tmp)
        try:
            times: dict[str, list[float]] = {"local": [], "local -j2": [], "ray": [],
                                             "slurm": []}
            for i in range(args.repeats):  # interleaved: a drift of the machine hits all three
                times["local"].append(lmlab_run(paths["local"], tmp / f"local{i}"))
                # Two at a time, as the 2-CPU Ray cluster runs them.
                times["local -j2"].append(lmlab_run(paths["local"], tmp / f"localj{i}",
                                                    "--parallel", "2"))
                times["ray"].append(lmlab_run(paths["ray"], tmp / f"ray{i}", "--executor", "ray",
                                              "--address", address))
                times["slurm"].append(lmlab_run(paths["slurm"], tmp / f"slurm{i}"))
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait()
    local = statistics.median(times["local"])
    print(f"tiny spec: 2 arms x 2 seeds, {args.steps} steps each, median of {args.repeats}")
    print(f"ray head start-up (once per cluster): {startup:.1f} s")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>9}: {med:6.1f} s  ({med / local:.2f}x local)  runs: "
              + ", ".join(f"{t:.1f}" for t in ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
