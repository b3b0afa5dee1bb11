"""Packed runs against the same runs one after another, as ratios measured in one process.

    python benchmarks/packed.py [--shapes tiny,small,quickstart,mid,wide,large] [--members 4,8] [--steps 30]
                                [--repeats 3]
    python benchmarks/packed.py --experiment [SPEC]     # `lmlab run` packed vs not, end to end

Steps mode: for each shape and member count, the members (seeds 0..N-1 of one config) train
``--steps`` steps once one after another (``lmlab.train.loop.train``, as `lmlab run` trains each
run) and once as one pack (``lmlab.train.pack.train_pack``), interleaved, ``--repeats`` times.
The figure is training tokens over training seconds summed over the members (warm-up included,
evaluation and diagnostics off), and the ratio packed / one after another of each repeat; the
median ratio is the result. Shapes (vocabulary, layers x width, sequence, batch):

- tiny:       512, 2 x 48, 32, 8 (the tests' model: launch-bound, as small models are on a GPU)
- small:      2048, 2 x 64, 64, 16
- quickstart: 4096, 2 x 128, 64, 16 (examples/quickstart.yaml)
- mid:        4096, 2 x 192, 128, 16 (the quickstart, 1.5x as wide)
- wide:       8192, 4 x 256, 128, 16
- large:      8192, 4 x 256, 256, 16 (the throughput benchmark's shape)

Experiment mode: `lmlab run SPEC` (default examples/quickstart.yaml) with --pack off and with
--pack auto (or ``--pack N``), each in a fresh directory, interleaved ``--repeats`` times:
wall-clock, every run's final validation loss and the report's verdict, side by side.

Each solo figure is also given as a share of this machine's fp32 matmul throughput (the FLOPs
of ``lmlab.execute.pack.step_flops``): a run already near 100% leaves packing nothing to win.

On a shared machine, run it more than once: other processes' load lands on whichever side
happens to be running (on this project's loaded machine it once showed 1.70x at the quickstart
shape; on the same machine quiet, 1.03x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.tokenize import prepare_data
from lmlab.execute.feasible import matmul_flops
from lmlab.execute.pack import step_flops
from lmlab.store import Store
from lmlab.train.loop import train
from lmlab.train.pack import Member, train_pack

DATA = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")) / "wikitext-2-test-articles"
SHAPES = {
    "tiny": (512, {"n_layer": 2, "n_head": 2, "d_model": 48}, 32, 8),
    "small": (2048, {"n_layer": 2, "n_head": 2, "d_model": 64}, 64, 16),
    "quickstart": (4096, {"n_layer": 2, "n_head": 4, "d_model": 128}, 64, 16),
    "mid": (4096, {"n_layer": 2, "n_head": 4, "d_model": 192}, 128, 16),
    "wide": (8192, {"n_layer": 4, "n_head": 4, "d_model": 256}, 128, 16),
    "large": (8192, {"n_layer": 4, "n_head": 4, "d_model": 256}, 256, 16),
}
OFF = {"layer_grad_norms": False, "norm_grad_norms": False, "activation_norms": False,
       "attention_entropy": False, "update_ratio": False}


def config(shape: str, seed: int, steps: int) -> RunConfig:
    vocab, model, seq, batch = SHAPES[shape]
    return RunConfig.model_validate({
        "data": {"dataset": "local", "path": str(DATA), "name": "wikitext-2-test-articles"},
        "tokenizer": {"kind": "bpe", "vocab_size": vocab}, "model": model,
        "optimizer": {"lr": 1e-3}, "train": {"batch_size": batch, "seq_len": seq, "seed": seed},
        "budget": {"steps": steps},
        "evaluation": {"every_steps": 10**9, "max_batches": 1, "test_at_end": False,
                       "diagnostics": OFF},
        "cadence": {"log_every_steps": 10, "checkpoint_every_steps": 10**9},
    })


def one_after_another(cfgs: list[RunConfig], data) -> float:
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp)) as store:
        tokens = seconds = 0.0
        for i, cfg in enumerate(cfgs):
            store.add_run(f"r{i}", "bench", i, cfg.to_json(), cfg.config_hash)
            s = train(cfg, f"r{i}", store, Path(tmp) / f"r{i}", data=data).summary
            tokens, seconds = tokens + s["tokens"], seconds + s["train_s"]
    return tokens / seconds


def packed(cfgs: list[RunConfig], data) -> float:
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp)) as store:
        for i, cfg in enumerate(cfgs):
            store.add_run(f"r{i}", "bench", i, cfg.to_json(), cfg.config_hash)
        results = train_pack([Member(f"r{i}", c, Path(tmp) / f"r{i}") for i, c in enumerate(cfgs)],
                             store, data=data)
    # Every member is charged the pack's seconds: the pack's throughput is all members' tokens
    # over one member's training seconds.
    return sum(r.summary["tokens"] for r in results) / results[0].summary["train_s"]


def steps_mode(args: argparse.Namespace) -> None:
    peak = matmul_flops("cpu", seconds=1.0)  # what no packing can exceed
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"fp32 matmul 1024^3: {peak / 1e9:.0f} GFLOP/s")
    for shape in args.shapes.split(","):
        data = prepare_data(config(shape, 0, 1).data, config(shape, 0, 1).tokenizer)
        cfg = config(shape, 0, 1)
        per_token = step_flops(cfg, data.tokenizer.vocab_size) / (cfg.train.batch_size
                                                                  * cfg.train.seq_len)
        print(f"{shape}: {per_token * cfg.train.batch_size * cfg.train.seq_len / 1e9:.2f} GFLOP "
              "per member step")
        for n in (int(m) for m in args.members.split(",")):
            cfgs = [config(shape, seed, args.steps) for seed in range(n)]
            ratios = []
            for r in range(args.repeats):  # interleaved, so load hits both alike
                solo, pack = one_after_another(cfgs, data), packed(cfgs, data)
                ratios.append(pack / solo)
                print(f"{shape} x{n} repeat {r}: one after another {solo:,.0f} tok/s "
                      f"({solo * per_token / peak:.0%} of the matmul peak)   packed {pack:,.0f} "
                      f"tok/s   ratio {ratios[-1]:.2f}", flush=True)
            print(f"{shape} x{n}: median ratio {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)


def lmlab(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *argv], capture_output=True,
                          text=True, check=True)


def experiment_mode(args: argparse.Namespace) -> None:
    from lmlab.analysis.records import load_runs

    results: dict[str, list[dict]] = {"off": [], "auto": []}
    for _ in range(args.repeats):
        for pack in ("off", "auto"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "exp"
                t0 = time.perf_counter()
                lmlab("run", args.spec, "--out", str(out),
                      "--pack", pack if pack == "off" else args.pack,
                      "--fallback-corpus", str(DATA))
                wall = time.perf_counter() - t0
                lmlab("report", str(out))
                with Store.open(out) as store:
                    finals = {r.run_id: r.metrics["final_val_loss"] for r in load_runs(store)}
                verdict = [line for line in (out / "report.md").read_text().splitlines()
                           if "☑" in line or "☐" in line or "Verdict" in line]
                results[pack].append({"wall_s": wall, "finals": finals, "verdict": verdict})
                print(f"--pack {pack if pack == 'off' else args.pack}: {wall:.0f} s  final val loss "
                      f"{json.dumps({k: round(v, 5) for k, v in finals.items()})}", flush=True)
    off, auto = results["off"], results["auto"]
    print(f"wall-clock: off {[round(r['wall_s']) for r in off]} s, auto "
          f"{[round(r['wall_s']) for r in auto]} s, ratio off/auto "
          f"{statistics.median(r['wall_s'] for r in off) / statistics.median(r['wall_s'] for r in auto):.2f}")
    worst = max(abs(a - b) / abs(b) for r_off, r_auto in zip(off, auto, strict=True)
                for a, b in zip(r_auto["finals"].values(), r_off["finals"].values(), strict=True))
    print(f"final val loss: largest relative difference packed vs not {worst:.2e}")
    print("verdict lines the same:", all(a["verdict"] == b["verdict"]
                                         for a, b in zip(off, auto, strict=True)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="quickstart,large")
    ap.add_argument("--members", default="4,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--pack", default="auto", help="experiment mode: the packed side's --pack")
    ap.add_argument("spec", nargs="?", default="examples/quickstart.yaml")
    args = ap.parse_args()
    if args.experiment:
        experiment_mode(args)
    else:
        steps_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
