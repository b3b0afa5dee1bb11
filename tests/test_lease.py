"""Nobody in: one driver per experiment directory and one worker per run, whatever the executor.

The lease itself (taken, refused with its holder named, taken over from a dead holder, never from
a live one, exactly one winner among racing takers), then the processes around it: a worker whose
driver's lock goes away stops and hands its run to the next worker; two `lmlab run` on one
directory (the second refused), the driver SIGKILLed (its workers do not outlive it) and the
rerun taking the stale lock over and ending with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.lease import (
    EXIT_ORPHANED,
    Holder,
    Lease,
    LeaseHeld,
    hold_directory,
    move_held_directory,
    pid_alive,
    read_holder,
)
from lmlab.names import LOCK_FILE
from lmlab.store import Store
from test_spec import _metric_values, base_spec, write

HOLD = """
import sys, time
from lmlab.execute.lease import Lease
lease = Lease(sys.argv[1], command="test holder")
lease.acquire()
lease.keep_renewed(0.1)
print(lease.token, flush=True)
time.sleep(600)
"""


def holder_process(path: Path) -> tuple[subprocess.Popen, str]:
    """A process holding the lease at ``path``, and its token."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    token = proc.stdout.readline().strip()
    assert token, "the holder process did not start"
    return proc, token


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def someone(**changes) -> Holder:
    me = Lease("unused")._me()
    return replace(me, **{"token": "someone-else", **changes})


def write_holder(path: Path, holder: Holder) -> None:
    path.write_text(json.dumps(asdict(holder)))


# ---- the lease ------------------------------------------------------------------------------

def test_a_live_holder_is_refused_by_name_and_a_dead_one_taken_over(tmp_path):
    path = tmp_path / "lease.json"
    proc, token = holder_process(path)
    try:
        with pytest.raises(LeaseHeld) as info:
            Lease(path).acquire()
        message = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert "since 20" in message and "test holder" in message
        assert info.value.holder.token == token
    finally:
        kill(proc)
    mine = Lease(path)
    stale = mine.acquire()  # its holder died without releasing it
    assert stale is not None and stale.pid == proc.pid
    assert read_holder(path).token == mine.token
    mine.release()
    assert read_holder(path) is None and path.exists()  # released; the file itself stays


def test_a_reused_pid_or_a_zombie_is_not_the_holder(tmp_path):
    path = tmp_path / "lease.json"
    # Our own pid, but a process that started at another time: the pid was reused.
    write_holder(path, someone(started=psutil.Process().create_time() - 1000))
    assert Lease(path).acquire().token == "someone-else"
    # A process that exited and was never reaped.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    deadline = time.time() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    write_holder(path, someone(pid=child.pid, started=started))
    assert not pid_alive(child.pid, started)
    assert Lease(path).acquire().pid == child.pid
    child.wait()


def test_a_holder_on_another_host_is_alive_while_it_renews(tmp_path):
    path = tmp_path / "lease.json"
    write_holder(path, someone(host="elsewhere", pid=1, renewed=time.time()))
    with pytest.raises(LeaseHeld, match="on host elsewhere"):
        Lease(path).acquire()
    write_holder(path, someone(host="elsewhere", pid=1, renewed=time.time() - 3600))
    assert Lease(path).acquire().host == "elsewhere"
    # Same host name, but another pid namespace (a container sharing the volume): its pids
    # mean nothing here, so only its heartbeat counts.
    write_holder(path, someone(pid=1, pidns="pid:[1]", renewed=time.time()))
    with pytest.raises(LeaseHeld):
        Lease(path).acquire()


def test_racing_takers_of_a_dead_holders_lease_exactly_one_wins(tmp_path):
    path = tmp_path / "lease.json"
    write_holder(path, someone(host="elsewhere", pid=1, renewed=0.0))
    go = tmp_path / "go"
    race = f"""
import os, sys, time
from lmlab.execute.lease import Lease, LeaseHeld
while not os.path.exists({str(go)!r}):
    time.sleep(0.001)
try:
    Lease({str(path)!r}).acquire()
    print("won", flush=True)
    time.sleep(3)  # a winner stays alive: the others must see a live holder
except LeaseHeld:
    print("refused", flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", race], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    time.sleep(1.0)  # every taker is waiting at the start line
    go.touch()
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 5 + ["won"]


def test_wait_renew_and_loss(tmp_path):
    path = tmp_path / "lease.json"
    first = Lease(path)
    first.acquire()
    first.keep_renewed(every_s=0.05)
    before = read_holder(path).renewed
    time.sleep(0.3)
    assert read_holder(path).renewed > before  # the heartbeat renews it
    with pytest.raises(LeaseHeld):
        Lease(path).acquire(wait_s=0.3)  # a live holder: waited for, then refused
    write_holder(path, someone(token="usurper"))  # somebody judged us dead and took over
    assert first.lost.wait(timeout=5)
    first.release()
    assert read_holder(path).token == "usurper"  # a lease that is not ours is left alone


def test_nested_holds_share_one_lock_and_a_move_keeps_it(tmp_path):
    exp = tmp_path / "exp"
    with hold_directory(exp) as outer:
        with hold_directory(exp) as inner:
            assert inner is outer
        assert read_holder(exp / LOCK_FILE).token == outer.token  # the inner exit kept it
        (exp / "results.txt").write_text("old")
        move_held_directory(exp, tmp_path / "old")
        assert read_holder(tmp_path / "old" / LOCK_FILE) is None  # the moved one is free
        assert (tmp_path / "old" / "results.txt").read_text() == "old"
        assert read_holder(exp / LOCK_FILE).token == outer.token  # and we still hold exp
    assert read_holder(exp / LOCK_FILE) is None


def test_a_second_driver_is_a_user_error_naming_the_first(tmp_path):
    exp = tmp_path / "exp"
    proc, _ = holder_process(exp / LOCK_FILE)
    try:
        with pytest.raises(UserError) as info, hold_directory(exp):
            pass
        assert info.value.file == str(exp) and f"kill {proc.pid}" in info.value.message
    finally:
        kill(proc)


# ---- workers ------------------------------------------------------------------------------

def _worker(out: Path, run_id: str, token: str) -> subprocess.Popen:
    """A worker as a remote executor would start it: not the driver's child, so only the
    lease tells it the driver is gone."""
    return subprocess.Popen([sys.executable, "-m", "lmlab.execute.worker", str(out), run_id,
                             "--driver-token", token], stderr=subprocess.PIPE, text=True)


def test_a_worker_whose_driver_is_gone_stops_and_hands_the_run_over(tmp_path, articles_data):
    out = tmp_path / "exp"
    cfg = RunConfig.model_validate({
        "data": articles_data, "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "train": {"batch_size": 4,
                                                                       "seq_len": 32},
        # Training seconds, not steps: the first worker is mid-run when its driver dies on any
        # machine, and the whole run takes the same few seconds however fast the steps are.
        "budget": {"wall_clock_s": 8}, "evaluation": {"max_batches": 1, "test_at_end": False},
        "cadence": {"log_every_steps": 5, "checkpoint_every_steps": 50}})
    with Store.open(out) as store:
        store.add_run("r", "a", 0, cfg.to_json(), cfg.config_hash)
    driver, token = holder_process(out / LOCK_FILE)
    first = _worker(out, "r", token)
    deadline = time.time() + 300
    while time.time() < deadline:
        with Store.open(out) as store:
            if store.metrics("r", ["train_loss"]).get("train_loss"):  # its first interval
                break
        time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()

    kill(driver)  # the driver dies; a new one takes its stale lock and starts a new worker
    t0 = time.time()
    new_driver, new_token = holder_process(out / LOCK_FILE)
    run_lease = out / "runs" / "r" / "lease.json"
    try:
        second = _worker(out, "r", new_token)
        holders = set()
        while time.time() - t0 < 60:
            holder = read_holder(run_lease)
            if first.poll() is not None:
                break
            # While the first worker lives, the run is its (or, once it let go, nobody's).
            assert holder is None or holder.pid == first.pid, holder
            holders.add(holder.pid if holder else None)
            time.sleep(0.02)
        assert first.wait(timeout=5) == EXIT_ORPHANED
        assert time.time() - t0 < 15  # it stopped within seconds, not at the end of its run
        assert "stopping: " in first.stderr.read()  # the driver is dead, or replaced
        assert second.wait(timeout=300) == 0, second.stderr.read()
    finally:
        kill(new_driver)
    assert first.pid in holders  # the check above did watch the first worker hold it
    with Store.open(out) as store:
        assert store.run("r")["status"] == "completed"
        steps = [r.step for r in store.metrics("r", ["train_loss"])["train_loss"]]
        events = store.events("r")
    assert steps == list(range(1, len(steps) + 1))  # every step once: none lost, none twice
    resumes = [e for e in events if e["kind"] == "resume"]
    interrupted = [e for e in events if e["kind"] == "interrupted"]
    assert len(resumes) == 1 and len(interrupted) <= 1
    if interrupted:  # it stopped at a step boundary in time: the second went on from there
        assert resumes[0]["detail"]["from_step"] == interrupted[0]["step"]


# ---- two drivers, a killed driver -------------------------------------------------------------

def test_two_runs_on_one_directory_then_a_killed_driver(tmp_path, articles_data):
    """The second `lmlab run` is refused naming the first; SIGKILL the first: its worker stops
    within seconds, the stale lock is taken over, and the rerun's rows are exactly those of an
    uninterrupted run."""
    spec = base_spec(articles_data)
    spec["meta"]["seeds"] = [0]
    spec["independent"]["arms"] = {"slow": {"optimizer.lr": 1e-3}}
    spec["hypothesis"]["checks"] = []
    spec["budget"] = {"tokens": 8 * 32 * 100}
    spec["evaluation"].update(every_steps=50)
    spec["cadence"].update(checkpoint_every_steps=20)
    path = write(tmp_path, spec)
    cmd = [sys.executable, "-m", "lmlab.cli", "run", str(path), "--skip-preflight", "--out"]
    subprocess.run([*cmd, str(tmp_path / "ref")], check=True, capture_output=True)
    reference = _metric_values(tmp_path / "ref")

    out = tmp_path / "exp"
    first = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    lease = out / "runs" / "slow-s0" / "lease.json"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if lease.exists() and (out / "lmlab.sqlite").exists():
            with Store.open(out) as store:
                rows = store.metrics("slow-s0", ["train_loss"]).get("train_loss", []) \
                    if store.run("slow-s0") else []
            if len(rows) >= 25:
                break
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    worker = read_holder(lease)
    assert worker is not None and pid_alive(worker.pid, worker.started)
    # The worker is paused while the second driver tries, so the first is mid-run however fast
    # this machine is; the driver itself runs on and holds the lock.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        second = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=120)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
    assert "since" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None  # the first one goes on, undisturbed

    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    t0 = time.time()
    while pid_alive(worker.pid, worker.started) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert not pid_alive(worker.pid, worker.started), "the worker outlived its driver"
    assert time.time() - t0 < 10
    with Store.open(out) as store:
        assert store.metrics("slow-s0", ["train_loss"])["train_loss"][-1].step < 100

    rerun = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over" in rerun.stderr and str(first.pid) in rerun.stderr
    with Store.open(out) as store:
        assert {r["status"] for r in store.runs()} == {"completed"}
        assert any(e["kind"] == "resume" for e in store.events("slow-s0"))
    assert _metric_values(out) == reference


def test_a_run_whose_worker_never_stops_is_left_to_it(tmp_path, articles_data):
    """A live worker that holds its run's lease (a stuck orphan, say) keeps it: the rerun's
    worker waits, then leaves that run alone, the other runs go on, and the user is told who
    holds it."""
    spec = base_spec(articles_data)
    spec["meta"]["seeds"] = [0]
    path = write(tmp_path, spec)
    out = tmp_path / "exp"
    holder, _ = holder_process(out / "runs" / "slow-s0" / "lease.json")
    try:
        done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(path),
                               "--skip-preflight", "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
    finally:
        kill(holder)
    assert done.returncode == 2, done.stderr
    assert "run slow-s0: already has a live worker, " \
           f"pid {holder.pid} on host {socket.gethostname()}" in done.stderr, done.stderr
    with Store.open(out) as store:
        states = {r["run_id"]: r["status"] for r in store.runs()}
        assert store.metrics("slow-s0") == {}  # nothing written beside the live worker
    assert states == {"slow-s0": "pending", "fast-s0": "completed"}
