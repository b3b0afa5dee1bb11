"""Sweeps on Ray and Slurm (submitit's local executor), against the local executor: the same
rows, bit for bit on CPU; a driver killed mid-sweep and a worker killed mid-run both resume with
no row duplicated or missing. One Ray cluster (``ray start --head`` on 127.0.0.1, two CPUs) is
shared by every test here: Ray's start-up is the slow part."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lmlab.execute.lease import read_holder
from lmlab.names import CHECKPOINT_FILE, LEASE_FILE, RUNS_DIR
from lmlab.store import Store
from test_spec import base_spec

ray = pytest.importorskip("ray", reason="CI installs lmlab[ray]; pip install 'lmlab[ray]'")
pytest.importorskip("submitit", reason="CI installs lmlab[slurm]; pip install 'lmlab[slurm]'")

# Timing differs between two runs; everything else in a row must not.
TIMED = {"step_time_s", "tokens_per_s", "peak_mem_bytes", "mfu"}
STEPS = 24  # per run: long enough to kill one mid-run, short enough for CI


def _env() -> dict[str, str]:
    # One thread everywhere: a CPU matmul's reduction order (so its last bit) follows the
    # thread count, and the Ray task gets one CPU.
    return {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_PROGRESS": "plain",
            "PYTHONUNBUFFERED": "1"}  # the Ray head's "started" line, as it is printed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on this machine for the session; stopped by ending the process that runs it
    (``--block``), never with ``ray stop``, which would stop every Ray of this host."""
    port = _free_port()
    temp = Path(f"/tmp/lmlab-ray-{os.getpid()}")  # short: Ray's socket paths have a limit
    ray_cli = Path(sys.executable).with_name("ray")
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats",
             "--object-store-memory=100000000", f"--temp-dir={temp}"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while b"Ray runtime started" not in log.read_bytes():
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    try:
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory, articles_data: dict) -> Path:
    spec = base_spec(articles_data)
    spec["budget"] = {"tokens": 8 * 32 * STEPS}
    spec["preflight"]["enabled"] = False
    spec["cadence"] = {"log_every_steps": 3, "checkpoint_every_steps": 4}
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def articles_data() -> dict:  # module scope: the spec above is built once
    from conftest import ARTICLES

    return {"dataset": "local", "path": str(ARTICLES), "name": "wikitext-2-test-articles"}


def lmlab_run(spec: Path, out: Path, *args: str, wait: bool = True
              ) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "lmlab.cli", "run", str(spec), "--out", str(out), *args]
    if not wait:
        log = open(out.parent / f"{out.name}.driver.log", "ab")  # noqa: SIM115
        return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log, start_new_session=True)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def local_reference(spec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local") / "exp"
    done = lmlab_run(spec_path, out)
    assert done.returncode == 0, done.stderr
    return records(out)


def records(out: Path) -> dict:
    """Every run's status, rows (without the timing) and events, as comparable values."""
    with Store.open(out) as store:
        got = {}
        for run in store.runs():
            rid = run["run_id"]
            rows = {name: [(r.step, r.tokens) + (() if name in TIMED else (r.value,))
                           for r in series]
                    for name, series in store.metrics(rid).items()}
            events = [(e["step"], e["kind"]) for e in store.events(rid)]
            got[rid] = {"status": run["status"], "rows": rows, "events": events}
    return got


def same_rows(got: dict, want: dict) -> None:
    """The same runs, completed, with the same rows; resumed runs may add resume events."""
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid]["status"] == want[rid]["status"] == "completed", rid
        assert got[rid]["rows"] == want[rid]["rows"], rid  # losses bit for bit
        assert [e for e in got[rid]["events"] if e[1] != "resume"] == want[rid]["events"], rid
        steps = [row[0] for row in got[rid]["rows"]["train_loss"]]
        assert steps == list(range(1, STEPS + 1)), rid  # every step once


def test_ray_executor_stores_what_the_local_executor_stores(
        spec_path: Path, tmp_path: Path, ray_address: str, local_reference: dict) -> None:
    out = tmp_path / "ray"
    done = lmlab_run(spec_path, out, "--executor", "ray", "--address", ray_address)
    assert done.returncode == 0, done.stderr
    same_rows(records(out), local_reference)
    with Store.open(out) as store:
        assert store.get_result("execute/jobs")  # which task trained which runs
        assert all(r["provenance"]["device"] == "cpu" for r in store.runs())
    assert not list(out.glob("runs/*/outbox/*.json"))  # every batch ingested


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 300,
              poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_a_ray_driver_killed_mid_sweep_resumes_with_every_row_once(
        spec_path: Path, tmp_path: Path, ray_address: str, local_reference: dict) -> None:
    out = tmp_path / "ray-killed"
    driver = lmlab_run(spec_path, out, "--executor", "ray", "--address", ray_address,
                       wait=False)
    assert isinstance(driver, subprocess.Popen)
    # Mid-sweep: some run has a checkpoint and has not finished.
    _wait_for(lambda: any(out.glob(f"{RUNS_DIR}/*/{CHECKPOINT_FILE}")), "a checkpoint", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = lmlab_run(spec_path, out, "--executor", "ray", "--address", ray_address)
    assert done.returncode == 0, done.stderr
    same_rows(records(out), local_reference)


def test_a_ray_task_killed_mid_run_is_retried_from_its_checkpoint(
        spec_path: Path, tmp_path: Path, ray_address: str, local_reference: dict) -> None:
    out = tmp_path / "ray-task"
    driver = lmlab_run(spec_path, out, "--executor", "ray", "--address", ray_address,
                       wait=False)
    assert isinstance(driver, subprocess.Popen)
    def training() -> tuple[Path, int] | None:
        """A run with a checkpoint that is still training: its directory and its worker's pid
        (a tiny run on a quiet machine can end between two looks, so only a live lease counts)."""
        for ckpt in out.glob(f"{RUNS_DIR}/*/{CHECKPOINT_FILE}"):
            holder = read_holder(ckpt.parent / LEASE_FILE)
            if holder is not None and holder.alive():
                return ckpt.parent, holder.pid
        return None

    _wait_for(lambda: training() is not None, "a run with a checkpoint, training", driver,
              poll=0.01)
    found = training()
    assert found is not None
    run_dir, pid = found
    os.kill(pid, signal.SIGKILL)  # the Ray worker process training that run
    assert driver.wait(600) == 0, (out.parent / "ray-task.driver.log").read_text()[-3000:]
    got = records(out)
    same_rows(got, local_reference)
    assert ("resume" in {k for _, k in got[run_dir.name]["events"]}), got[run_dir.name]["events"]


def test_submitit_local_executor_stores_what_the_local_executor_stores(
        spec_path: Path, tmp_path: Path, local_reference: dict) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    spec["execution"] = {"executor": "slurm", "slurm": {"cluster": "local", "time_min": 10}}
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "slurm"
    done = lmlab_run(path, out, "--storage", str(tmp_path / "shared"))
    assert done.returncode == 0, done.stderr
    same_rows(records(out), local_reference)
    # Checkpoints and batches lived under the storage; the store is the driver's alone.
    assert len(list((tmp_path / "shared").glob(f"{RUNS_DIR}/*/{CHECKPOINT_FILE}"))) == 4
    assert not list(out.glob(f"{RUNS_DIR}/*/{CHECKPOINT_FILE}"))


def test_a_restarted_slurm_driver_adopts_the_jobs_still_running(
        spec_path: Path, tmp_path: Path, local_reference: dict) -> None:
    """Slurm keeps a job running when the driver that submitted it dies: the driver started
    again picks the job up (it holds its runs' leases) instead of submitting it twice, and
    ingests what it sent meanwhile."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["execution"] = {"executor": "slurm", "slurm": {"cluster": "local", "time_min": 10}}
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "slurm-restarted"
    driver = lmlab_run(path, out, wait=False)
    assert isinstance(driver, subprocess.Popen)
    _wait_for(lambda: any(out.glob(f"{RUNS_DIR}/*/outbox/*.json")), "a job's first rows", driver)
    with Store.open(out) as store:
        before = store.get_result("execute/jobs")
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: its jobs are Slurm's (here: orphans)
    driver.wait()
    done = lmlab_run(path, out)
    assert done.returncode == 0, done.stderr
    same_rows(records(out), local_reference)
    with Store.open(out) as store:
        after = store.get_result("execute/jobs")
    adopted = [first for first, job in before.items() if after[first]["job_id"] == job["job_id"]]
    assert adopted, (before, after)  # at least the job that was running was not submitted again


def test_a_run_over_two_ranks_trains_inside_one_ray_task(
        spec_path: Path, tmp_path: Path, ray_address: str, local_reference: dict) -> None:
    """train.distributed on a cluster: the Ray task (two CPUs) starts torchrun, rank 0 sends the
    rows; the curve is the single-process one within fp32 summation order."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["meta"]["seeds"] = [0]
    spec["controlled"]["train"]["distributed"] = {"nproc": 2}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "ray-ddp"
    done = lmlab_run(path, out, "--executor", "ray", "--address", ray_address)
    assert done.returncode == 0, done.stderr
    got = records(out)
    with Store.open(out) as store:
        assert {r["provenance"]["world_size"] for r in store.runs()} == {2}
    for rid, run in got.items():
        want = local_reference[rid]["rows"]["train_loss"]
        have = run["rows"]["train_loss"]
        assert run["status"] == "completed" and [r[:2] for r in have] == [r[:2] for r in want]
        assert max(abs(a[2] - b[2]) for a, b in zip(have, want, strict=True)) <= 1e-4, rid
