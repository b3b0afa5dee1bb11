"""What the optional diagnostics cost the training loop, at their default cadence.

Trains the core benchmark shapes (4 layers, d_model 256, 4 heads, seq 256, batch 16, BPE vocab
8192, AdamW) through the real loop (``lmlab.train.loop.train``) twice per repeat: diagnostics off
(every flag False) and on (``DiagnosticsConfig()`` defaults: everything, every 50 steps).
Target: <= 3% more wall-clock per step with diagnostics on.

Interleaving: the two runs train in one process, in two threads that take turns one optimizer
step at a time (a baton passed in a global optimizer step hook), so step i of one run and step i
of the other run back to back and a busy machine's load swings hit both alike. Interleaving
whole runs instead is useless on a shared machine: the load changes between two five-minute runs
by far more than 3%. Which run takes the first turn alternates between repeats.

What is timed: each run's turns, from taking the baton to its next optimizer step, i.e. the
previous step's between-step work (diagnostics, store flush) plus the step itself, over a window
of ``probes x every_steps`` steps that starts half a cadence into the run. The window holds
exactly ``probes`` probes with all their work, and no evaluation, setup or first-step warm-up.
Two figures per repeat:

- end to end: the on run's window time / the off run's - 1;
- direct: the time spent inside the diagnostics' own methods (snapshot, gradient norms, update
  ratios, probe forward), timed as they run, over the off run's window time. Far less noisy; a
  lower bound, since it leaves out the loop's own bookkeeping around them.

The figure reported is the median over repeats. Tests never assert on it (timing is not a test).

    LMLAB_DATA_DIR=/path/to/shared/data python benchmarks/diagnostics_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lmlab.config import DiagnosticsConfig, RunConfig
from lmlab.data.tokenize import DataBundle, prepare_data
from lmlab.store import Store
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.loop import train

OFF = {"layer_grad_norms": False, "norm_grad_norms": False, "activation_norms": False,
       "attention_entropy": False, "update_ratio": False}


def config(args: argparse.Namespace, diagnostics: dict, steps: int) -> RunConfig:
    data_dir = Path(os.environ.get("LMLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared"
                                   / "data"))
    data = ({"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
             "name": "wikitext-2-test-articles"} if args.data is None
            else {"dataset": "wikitext-2-raw-v1", "path": args.data})
    model = ({"n_layer": 2, "n_head": 2, "d_model": 64} if args.quick
             else {"n_layer": 4, "n_head": 4, "d_model": 256})
    return RunConfig.model_validate({
        "data": data,
        "tokenizer": {"kind": "bpe", "vocab_size": 512 if args.quick else 8192},
        "model": model,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "cosine", "warmup_steps": 10},
        "train": {"batch_size": 16, "seq_len": 64 if args.quick else 256, "device": args.device},
        "budget": {"steps": steps},
        # No evaluation or checkpoint inside the window: step 0 and the end only.
        "evaluation": {"every_steps": 10 * steps, "max_batches": 2, "test_at_end": False,
                       "diagnostics": diagnostics},
        "cadence": {"log_every_steps": 10, "checkpoint_every_steps": 10 * steps},
    })


class LockStep:
    """Lets named threads run one optimizer step each in turn, and times every turn."""

    def __init__(self, names: list[str], sync: bool) -> None:
        self.names = names
        self.sync = sync
        self.cond = threading.Condition()
        self.turn = names[0]
        self.done: set[str] = set()
        self.began: dict[str, float] = {}
        self.turns: dict[str, list[float]] = {n: [] for n in names}  # one per optimizer step
        self.diag_s: dict[str, list[tuple[int, float]]] = {n: [] for n in names}

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.began[name] = time.perf_counter()

    def release(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            others = [n for n in self.names if n != name and n not in self.done]
            if others:
                self.turn = others[0]
                self.cond.notify_all()

    def after_step(self, *_: object) -> None:
        """Global optimizer step hook: close this thread's turn and wait for the next."""
        name = threading.current_thread().name
        if name not in self.turns:
            return
        if self.sync:
            torch.cuda.synchronize()
        self.turns[name].append(time.perf_counter() - self.began[name])
        self.release(name)
        self.acquire(name)

    def time_diagnostics(self) -> dict:
        """Wrap the Diagnostics methods to record (step, seconds) per call and thread."""
        originals = {m: getattr(Diagnostics, m)
                     for m in ("snapshot", "grad_norms", "update_ratios", "probe")}
        for method, original in originals.items():
            def timed(diag: Diagnostics, *a: object, _orig=original) -> object:
                t = time.perf_counter()
                out = _orig(diag, *a)
                if self.sync:
                    torch.cuda.synchronize()
                name = threading.current_thread().name
                self.diag_s[name].append((len(self.turns[name]), time.perf_counter() - t))
                return out
            setattr(Diagnostics, method, timed)
        return originals


def run_pair(cfgs: dict[str, RunConfig], order: list[str], data: DataBundle, workdir: Path,
             sync: bool) -> LockStep:
    lock = LockStep(order, sync)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        lock.acquire(name)
        try:
            store = Store.open(workdir / name)
            store.add_run(name, name, 0, cfgs[name].to_json(), cfgs[name].config_hash)
            result = train(cfgs[name], name, store, workdir / name / "run", data=data)
            store.close()
            if result.status != "completed":
                raise RuntimeError(f"benchmark run {name} ended {result.status}")
        except BaseException as e:
            errors.append(e)
        finally:
            lock.release(name, finished=True)

    handle = register_optimizer_step_post_hook(lock.after_step)
    originals = lock.time_diagnostics()
    try:
        threads = [threading.Thread(target=worker, args=(n,), name=n) for n in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
        for method, original in originals.items():
            setattr(Diagnostics, method, original)
    if errors:
        raise errors[0]
    return lock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="off/on pairs (default 3)")
    parser.add_argument("--probes", type=int, default=1,
                        help="probes per timed window: the window is probes x every_steps steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--data", default=None, help="a WikiText-2 raw directory (default: the "
                        "test-articles corpus in $LMLAB_DATA_DIR)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to try the script")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    every = DiagnosticsConfig().every_steps
    start = every // 2  # the window starts half a cadence in: clear of the step-0 probe
    window = args.probes * every
    steps = start + window + 2  # +2: the last probe's between-step work, and a margin
    cfgs = {"off": config(args, OFF, steps), "on": config(args, {}, steps)}
    data = prepare_data(cfgs["on"].data, cfgs["on"].tokenizer)
    cuda = args.device != "cpu" and torch.cuda.is_available()
    m, t = cfgs["on"].model, cfgs["on"].train
    print(f"shapes: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, seq {t.seq_len}, "
          f"batch {t.batch_size}, vocab {data.tokenizer.vocab_size}, AdamW; diagnostics every "
          f"{every} steps; window: steps {start + 1}-{start + window} ({args.probes} probe(s)), "
          "off and on interleaved step by step")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}")

    end_to_end, direct = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            lock = run_pair(cfgs, order, data, Path(tmp) / f"r{r}", cuda)
            # turns[n][i] is 0-based step i (with step i-1's between-step work).
            win = {n: sum(lock.turns[n][start + 1:start + window + 1]) for n in cfgs}
            median = {n: statistics.median(lock.turns[n][start + 1:start + window + 1])
                      for n in cfgs}
            # A call made while i turns are closed belongs to turn i (0-based step i).
            inside = sum(s for i, s in lock.diag_s["on"] if start < i <= start + window)
            e2e, own = win["on"] / win["off"] - 1, inside / win["off"]
            end_to_end.append(e2e)
            direct.append(own)
            print(f"repeat {r + 1} ({' first, '.join(order)} second): median step "
                  f"{median['off'] * 1e3:.1f} ms off, {median['on'] * 1e3:.1f} ms on; window "
                  f"{win['off']:.2f} s off, {win['on']:.2f} s on -> end to end {e2e:+.2%}; "
                  f"{inside * 1e3:.1f} ms inside the diagnostics -> direct {own:+.2%}",
                  flush=True)
    print(f"overhead of diagnostics at the default cadence (every {every} steps), median of "
          f"{args.repeats}: end to end {statistics.median(end_to_end):+.2%}, direct "
          f"{statistics.median(direct):+.2%} (target <= 3%)")


if __name__ == "__main__":
    main()
