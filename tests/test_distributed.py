"""One run over two CPU ranks (torchrun over gloo, DDP and FSDP2): the same loss curve and
diagnostics as one process for the same global batch and data order, within fp32
summation-order noise; a rank SIGKILLed mid-run leaves a run that resumes; a sharded run stopped
mid-run resumes to the curve of one never stopped; a global batch the ranks cannot share, and an
optimizer that needs whole matrices under FSDP, are refused."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from pydantic import ValidationError

from lmlab.config import RunConfig
from lmlab.execute.lease import read_holder
from lmlab.names import CHECKPOINT_FILE, LEASE_FILE
from lmlab.store import Store
from lmlab.train.loop import train
from test_spec import base_spec
from test_train import tiny_config

# |Δ train loss| (and |Δ| of every diagnostic, relative) between 2 ranks and 1 process, per
# step. The ranks sum the same gradients in another order (two half-batch means averaged instead
# of one mean; FSDP also sums each norm over two shards): ~1e-7 per step in fp32, compounding
# over the run; measured 4.8e-7 (DDP) and 4.8e-7 (FSDP) after 24 steps of the tiny model here.
TOLERANCE = 1e-4
STEPS = 24


def _cfg(articles_data: dict, nproc: int, steps: int = STEPS, strategy: str = "ddp",
         ) -> RunConfig:
    # grad_accum 4: each rank accumulates 2 micro-batches of 2 (no gradient sync on the first).
    distributed = {"nproc": nproc} | ({"strategy": strategy} if nproc > 1 else {})
    return tiny_config(articles_data, train={"batch_size": 8, "seq_len": 32, "grad_accum": 4,
                                             "distributed": distributed},
                       budget={"steps": steps}, cadence={"log_every_steps": 3,
                                                         "checkpoint_every_steps": 4},
                       evaluation={"diagnostics": {"every_steps": 6}})


def _torchrun(out: Path, run_id: str, wait: bool = True) -> subprocess.Popen | int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lmlab.execute.worker", str(out), run_id]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=open(out / f"{run_id}.log", "ab"))  # noqa: SIM115
    return proc.wait(600) if wait else proc


def _losses(store: Store, run_id: str) -> list[tuple[int, float]]:
    return [(r.step, r.value) for r in store.metrics(run_id, ["train_loss"])["train_loss"]]


def _add(store: Store, run_id: str, cfg: RunConfig) -> None:
    store.add_run(run_id, "a", cfg.train.seed, cfg.to_json(), cfg.config_hash)


def _diagnostics(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    names = [n for n in store.metric_names(run_id) if "/" in n]
    return {n: [(r.step, r.value) for r in rows]
            for n, rows in store.metrics(run_id, names).items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_ranks_reproduce_the_single_process_curve(tmp_path: Path, articles_data: dict,
                                                         strategy: str) -> None:
    out = tmp_path / "exp"
    one, two = _cfg(articles_data, 1), _cfg(articles_data, 2, strategy=strategy)
    with Store.open(out) as store:
        _add(store, "one", one)
        _add(store, "two", two)
        train(one, "one", store, out / "runs" / "one")
    assert _torchrun(out, "two") == 0, (out / "two.log").read_text()[-3000:]
    with Store.open(out) as store:
        a, b = _losses(store, "one"), _losses(store, "two")
        assert store.run("two")["status"] == "completed"
        assert store.run("two")["provenance"]["world_size"] == 2
        assert store.run("one")["provenance"]["world_size"] == 1
        assert len(store.events("two", "resume")) == 0
        val_a = store.metrics("one", ["val_loss"])["val_loss"]
        val_b = store.metrics("two", ["val_loss"])["val_loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))  # rank 0 only
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    print(f"max |Δ train loss| 2 ranks vs 1 process: {worst:.3g}")
    assert worst <= TOLERANCE, worst
    assert max(abs(x.value - y.value) for x, y in zip(val_a, val_b, strict=True)) <= TOLERANCE
    # Per-block gradient norms and update ratios: summed over the shards under FSDP.
    with Store.open(out) as store:
        diag_a, diag_b = _diagnostics(store, "one"), _diagnostics(store, "two")
    assert set(diag_a) == set(diag_b) and any(n.startswith("grad_norm/block.") for n in diag_a)
    for name, rows in diag_a.items():
        assert [s for s, _ in rows] == [s for s, _ in diag_b[name]], name
        for (_, x), (_, y) in zip(rows, diag_b[name], strict=True):
            assert abs(x - y) <= TOLERANCE * max(1.0, abs(x)), (name, x, y)


def test_a_rank_killed_mid_run_leaves_a_run_that_resumes(tmp_path: Path,
                                                        articles_data: dict) -> None:
    """Through ``lmlab train --nproc-per-node 2``: SIGKILL rank 1 after a checkpoint; torchrun
    ends the run (failed), and the same command again resumes it to completion."""
    steps = 60
    tree = _cfg(articles_data, 1, steps).model_dump(mode="json")
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "exp"  # the run is r-s0: `lmlab train` names it after the file and seed
    cmd = [sys.executable, "-m", "lmlab.cli", "train", str(config), "--out", str(out),
           "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"  # a file, not a pipe nobody reads while it runs
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while not (out / "runs" / "r-s0" / CHECKPOINT_FILE).exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    holder = read_holder(out / "runs" / "r-s0" / LEASE_FILE)  # rank 0 holds the run's lease
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "lmlab.execute.worker" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    assert len(ranks) == 2 and holder is not None and holder.pid in {p.pid for p in ranks}
    os.kill(next(p.pid for p in ranks if p.pid != holder.pid), signal.SIGKILL)
    assert proc.wait(300) == 1
    with Store.open(out) as store:
        assert store.run("r-s0")["status"] in ("failed", "interrupted")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    with Store.open(out) as store:
        assert store.run("r-s0")["status"] == "completed"
        assert store.run("r-s0")["provenance"]["world_size"] == 2
        assert [s for s, _ in _losses(store, "r-s0")] == list(range(1, steps + 1))  # each once
        assert store.events("r-s0", "resume")


def _refused(tmp_path: Path, spec: dict, field: str) -> str:
    """`lmlab validate` on ``spec``: exit 2, one message naming the file, its line and
    ``field``. Returns the message."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "spec.yaml:" in done.stderr and field in done.stderr, done.stderr
    return done.stderr


def test_a_global_batch_the_ranks_cannot_share_is_refused(tmp_path: Path,
                                                         articles_data: dict) -> None:
    with pytest.raises(ValidationError, match=r"not divisible by distributed\.nproc"):
        tiny_config(articles_data, train={"batch_size": 9, "seq_len": 32,
                                          "distributed": {"nproc": 2}})
    spec = base_spec(articles_data)
    spec["controlled"]["train"] = {"batch_size": 9, "seq_len": 32, "distributed": {"nproc": 2}}
    _refused(tmp_path, spec, "distributed.nproc")
    config = tmp_path / "odd.yaml"  # the same batch, ranks asked for on the command line
    config.write_text(yaml.safe_dump(tiny_config(articles_data, train={"batch_size": 9}
                                                 ).model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(config), "--out",
                           str(tmp_path / "odd"), "--nproc-per-node", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--nproc-per-node" in done.stderr and "not divisible" in done.stderr, done.stderr


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "lmlab.execute.worker" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


def test_a_sharded_run_stopped_mid_run_resumes_to_the_uninterrupted_curve(
        tmp_path: Path, articles_data: dict) -> None:
    """FSDP2 over 2 ranks, asked to stop (SIGTERM to both ranks) after its first checkpoint: the
    ranks agree on one step to stop at, gather the whole state (weights, AdamW moments, EMA)
    into rank 0's checkpoint, and the rerun loads it into the shards and ends with exactly the
    rows of a run never stopped (its evaluations are of the EMA weights)."""
    steps = 36
    out = tmp_path / "exp"
    cfg = _cfg(articles_data, 2, steps, strategy="fsdp")  # with EMA weights, sharded as well
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ema_decay": 0.9})})
    with Store.open(out) as store:
        _add(store, "ref", cfg)
        _add(store, "cut", cfg)
    assert _torchrun(out, "ref") == 0, (out / "ref.log").read_text()[-3000:]
    proc = _torchrun(out, "cut", wait=False)
    assert isinstance(proc, subprocess.Popen)
    deadline = time.monotonic() + 300
    while not (out / "runs" / "cut" / CHECKPOINT_FILE).exists():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (out / "cut.log").read_text()[-3000:]
        time.sleep(0.05)
    for rank in _ranks(proc):
        rank.send_signal(signal.SIGTERM)
    proc.wait(300)
    with Store.open(out) as store:
        assert store.run("cut")["status"] == "interrupted", (out / "cut.log").read_text()[-3000:]
        stopped_at = store.events("cut", "interrupted")[0]["step"]
    assert stopped_at < steps
    assert _torchrun(out, "cut") == 0, (out / "cut.log").read_text()[-3000:]
    with Store.open(out) as store:
        ref, cut = _losses(store, "ref"), _losses(store, "cut")
        assert store.run("cut")["status"] == "completed" and store.events("cut", "resume")
        val_ref = [r.value for r in store.metrics("ref", ["val_loss"])["val_loss"]]
        val_cut = [r.value for r in store.metrics("cut", ["val_loss"])["val_loss"]]
    assert [s for s, _ in cut] == list(range(1, steps + 1))  # each step once
    assert cut == ref  # the whole state went through the checkpoint: bit-identical
    assert val_cut == val_ref


def test_fsdp_refuses_an_optimizer_that_needs_whole_matrices(tmp_path: Path,
                                                            articles_data: dict) -> None:
    with pytest.raises(ValidationError, match=r"needs distributed\.nproc of 2"):
        tiny_config(articles_data, train={"distributed": {"strategy": "fsdp"}})
    with pytest.raises(ValidationError, match="Muon orthogonalises"):
        tiny_config(articles_data, optimizer={"name": "muon"},
                    train={"distributed": {"nproc": 2, "strategy": "fsdp"}})
    tiny_config(articles_data, optimizer={"name": "lion"},  # elementwise: shards are fine
                train={"distributed": {"nproc": 2, "strategy": "fsdp"}})
    spec = base_spec(articles_data)  # in a spec: exit 2, naming the file, line and field
    spec["controlled"]["optimizer"] = {"name": "adafactor"}
    spec["controlled"]["train"] = {"batch_size": 8, "seq_len": 32,
                                   "distributed": {"nproc": 2, "strategy": "fsdp"}}
    assert "Adafactor factors" in _refused(tmp_path, spec, "distributed.strategy")


# Put on PYTHONPATH for the ranks: rank 1's loss goes non-finite at step 11 (its 21st
# micro-batch: 2 per step), rank 0's never does.
_ONE_RANK_NAN = '''
import math
import os
if os.environ.get("RANK") == "1":
    import torch
    import lmlab.train.step as step
    _real, _calls = step.linear_cross_entropy, [0]
    def _poisoned(*args, **kwargs):
        ce, objective = _real(*args, **kwargs)
        _calls[0] += 1
        if _calls[0] == 21:
            return ce * float("nan"), objective * float("nan")
        return ce, objective
    step.linear_cross_entropy = _poisoned
'''


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_stops_every_rank_at_that_step_with_one_event(
        tmp_path: Path, articles_data: dict, strategy: str) -> None:
    out = tmp_path / "exp"
    cfg = _cfg(articles_data, 2, strategy=strategy)
    with Store.open(out) as store:
        _add(store, "r", cfg)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ONE_RANK_NAN)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lmlab.execute.worker", str(out), "r"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # both ranks ended, neither hung
    with Store.open(out) as store:
        events = store.events("r", "nan")
        losses = _losses(store, "r")
        status = store.run("r")["status"]
    assert status == "diverged"
    assert len(events) == 1 and events[0]["step"] == 11  # rank 0 says it, for both
    assert [s for s, _ in losses][:10] == list(range(1, 11))
    assert all(math.isfinite(v) for _, v in losses[:10]) and not math.isfinite(losses[-1][1])
