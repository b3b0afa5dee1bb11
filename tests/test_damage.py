"""Nothing lost: damaged or crafted files are met with a clear message and a way on.

Checkpoints are data (a crafted pickle never runs its code; a damaged checkpoint is set aside and
the run resumes from the one before, or afresh, to exactly the rows of an uninterrupted run). A
store that is not a database, or whose pages are damaged, is refused by every command with exit
2 and left as it was; ``lmlab doctor`` checks it and copies what can be read into a new store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.errors import UserError
from lmlab.names import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE
from lmlab.store import Store
from lmlab.store.doctor import diagnose
from lmlab.train import checkpoint as ckpt_module
from lmlab.train.checkpoint import read_checkpoint, save_checkpoint
from lmlab.train.loop import train
from test_train import _values, _write_config, run, tiny_config


def lmlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)],
                          capture_output=True, text=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- checkpoints are data ------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_never_runs_its_code(tmp_path, articles_data):
    cfg = tiny_config(articles_data, budget={"steps": 5})
    config = _write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "out" / "runs" / "c-s0"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    crafted = run_dir / CHECKPOINT_FILE
    torch.save({"format": 2, "config": cfg.to_json(), "learner": RunsCode(marker),
                "state": {}, "recorder": {}}, crafted)
    torch.load(crafted, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    before = sha(crafted)

    done = lmlab("train", config, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert f"{crafted}: not a checkpoint lmlab wrote: loading it would call" in done.stderr
    assert "posix.system" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()
    assert sha(crafted) == before  # left where it was, as it was


def test_a_new_checkpoint_replaces_the_last_only_once_complete(tmp_path, monkeypatch,
                                                               articles_data):
    cfg = tiny_config(articles_data)
    save_checkpoint(tmp_path, cfg, {"learner": {"w": torch.ones(3)}, "state": {}, "recorder": {}})
    save_checkpoint(tmp_path, cfg, {"learner": {"w": torch.full((3,), 2.0)}, "state": {},
                                    "recorder": {}})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", dies_halfway)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, cfg, {"learner": {}, "state": {}, "recorder": {}})
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["learner"]["w"].tolist() == [2.0] * 3
    assert read_checkpoint(tmp_path / PREVIOUS_CHECKPOINT_FILE)["learner"]["w"].tolist() == [1.0] * 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: 40 steps, checkpoints every 10."""
    articles = {"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
                "name": "wikitext-2-test-articles"}
    cfg = tiny_config(articles, model={"dropout": 0.1})
    return cfg, _values(run(cfg, tmp_path_factory.mktemp("reference")))


def _interrupted(cfg, out: Path) -> Store:
    """The run stopped between steps 27 and 28: checkpoint.pt at step 27, the previous at 20."""
    store = Store.open(out)
    store.add_run("r", "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 27

    assert train(cfg, "r", store, out / "runs" / "r", should_stop=stop).status == "interrupted"
    return store


def _flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, resumed_from", [
    ("truncate the last", 20),
    ("flip bytes in both", None),
])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_goes_on(tmp_path, reference, damage,
                                                               resumed_from):
    cfg, expected = reference
    store = _interrupted(cfg, tmp_path)
    run_dir = tmp_path / "runs" / "r"
    last, previous = run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE
    assert read_checkpoint(last)["state"]["step"] == 27
    assert read_checkpoint(previous)["state"]["step"] == 20
    if damage == "truncate the last":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        damaged = {CHECKPOINT_FILE: sha(last)}
    else:
        _flip_tensor_bytes(last)
        _flip_tensor_bytes(previous)
        damaged = {CHECKPOINT_FILE: sha(last), PREVIOUS_CHECKPOINT_FILE: sha(previous)}

    result = train(cfg, "r", store, run_dir)
    assert result.status == "completed"
    assert _values(store) == expected  # every row once, as if never interrupted
    events = store.events("r")
    resumes = [e["detail"]["from_step"] for e in events if e["kind"] == "resume"]
    assert resumes == ([] if resumed_from is None else [resumed_from])
    set_aside = [e["detail"] for e in events if e["kind"] == "checkpoint_damaged"]
    assert [d["file"] for d in set_aside] == list(damaged)
    for d in set_aside:  # kept aside, byte for byte
        assert sha(run_dir / d["moved_to"]) == damaged[d["file"]] and d["error"]
    assert read_checkpoint(last)["state"]["step"] == 40


# ---- a damaged store -----------------------------------------------------------------------

def _small_store(directory: Path, runs: int = 3, steps: int = 3000) -> None:
    with Store.open(directory) as store:
        for i in range(runs):
            store.add_run(f"r{i}", "a", i, '{"x": 1}', "h")
            store.log_many(f"r{i}", [(s, s * 8, s * 0.01, {"train_loss": 1.0 / s, "lr": 0.1})
                                     for s in range(1, steps + 1)])
            store.log_event(f"r{i}", 5, 40, 0.05, "spike", {"loss": 2.0})
            store.set_status(f"r{i}", "completed", summary={"steps": steps})
        store.put_result("experiment/plan", {"runs": []})


def _damage_pages(path: Path, first: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(4096 * first)
        f.write(os.urandom(4096 * count))


def test_random_bytes_in_the_store_are_refused_by_every_command(tmp_path, articles_data):
    exp = tmp_path / "exp"
    exp.mkdir()
    store_file = exp / "lmlab.sqlite"
    store_file.write_bytes(os.urandom(20_000))
    before = sha(store_file)
    spec = tmp_path / "spec.yaml"
    from test_spec import base_spec, write

    write(tmp_path, base_spec(articles_data))
    for args in (("status", exp), ("report", exp), ("run", spec, "--out", exp)):
        done = lmlab(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert f"{store_file}: not an SQLite database" in done.stderr, done.stderr
        assert f"lmlab doctor {exp}" in done.stderr and "Traceback" not in done.stderr
    assert sha(store_file) == before

    doctor = lmlab("doctor", exp)
    assert doctor.returncode == 2 and "nothing in it can be read" in doctor.stderr, doctor.stderr
    assert sha(store_file) == before


def test_damaged_pages_are_refused_and_doctor_recovers_the_rest(tmp_path):
    exp = tmp_path / "exp"
    _small_store(exp)
    store_file = exp / "lmlab.sqlite"
    pages = store_file.stat().st_size // 4096
    _damage_pages(store_file, pages // 2, 2)  # inside the metrics
    before = sha(store_file)

    status = lmlab("status", exp)
    assert status.returncode == 2, status.stderr
    assert f"{store_file}: damaged (database disk image is malformed)" in status.stderr
    assert "Traceback" not in status.stderr and f"lmlab doctor {exp}" in status.stderr
    assert sha(store_file) == before

    check = lmlab("doctor", exp)
    assert check.returncode == 1, check.stderr
    assert "integrity check" in check.stdout and "--recover" in check.stdout
    assert sha(store_file) == before  # checking never writes

    recover = lmlab("doctor", exp, "--recover")
    assert recover.returncode == 0, recover.stderr
    kept = [p for p in exp.iterdir() if p.name.startswith("lmlab.sqlite.damaged-")]
    assert len(kept) == 1 and sha(kept[0]) == before  # the damaged file, kept aside as it was
    with Store.existing(exp) as store:
        assert [r["run_id"] for r in store.runs()] == ["r0", "r1", "r2"]
        assert all(r["status"] == "completed" for r in store.runs())
        counts = [len(store.metrics(f"r{i}", ["train_loss"])["train_loss"]) for i in range(3)]
        lost = {e["run_id"]: e["detail"] for e in store.events(kind="rows_lost")}
        assert store.get_result("experiment/plan") == {"runs": []}
    assert 0 < 3 * 3000 - sum(counts) < 3000, counts  # two pages lost, not a run's worth
    assert lost and all(counts[int(rid[1])] < 3000 for rid in lost)  # flagged where rows went
    assert diagnose(exp).whole  # the new store passes the check


def test_a_wal_without_its_database_is_refused(tmp_path):
    exp = tmp_path / "exp"
    _small_store(exp, runs=1, steps=10)
    conn = sqlite3.connect(exp / "lmlab.sqlite")  # a writer holding the WAL open
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("INSERT INTO results VALUES ('k', '1', 'now')")
    conn.commit()
    wal = exp / "lmlab.sqlite-wal"
    assert wal.exists()
    shutil.copy(wal, tmp_path / "wal-copy")
    conn.close()
    (exp / "lmlab.sqlite").unlink()
    shutil.copy(tmp_path / "wal-copy", wal)  # the database went, its WAL stayed behind
    for args in (("status", exp), ("doctor", exp)):
        done = lmlab(*args)
        assert done.returncode == 2, done.stderr
        assert f"{wal}" in done.stderr and "without its database" in done.stderr, done.stderr
    with pytest.raises(UserError, match="without its database"):
        Store.open(exp)  # `lmlab run` and `train` too: never a fresh store beside an old WAL
    assert not (exp / "lmlab.sqlite").exists()
