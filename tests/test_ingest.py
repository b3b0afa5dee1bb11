"""The one way rows reach the store (lmlab.store.ingest): batches keyed by (run, segment, seq),
ingested once each, stale ones refused, whether delivered in-process (the local executor) or as
files in an outbox (Ray, Slurm)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from lmlab.config import RunConfig
from lmlab.store import Store
from lmlab.store import db as dbmod
from lmlab.store import ingest as ingest_mod
from lmlab.store.ingest import Batch, Ingested, Outbox, ingest, read_outbox
from lmlab.train.checkpoint import set_aside_checkpoints
from lmlab.train.loop import train
from test_train import tiny_config

CONFIG = '{"x": 1}'


def _store(tmp_path: Path) -> Store:
    store = Store.open(tmp_path / "exp")
    store.add_run("r", "a", 0, CONFIG, "h")
    return store


def _rows(store: Store, run_id: str = "r") -> dict:
    return {name: [tuple(r) for r in rows] for name, rows in store.metrics(run_id).items()}


def _events(store: Store, run_id: str = "r") -> list[tuple]:
    return [(e["step"], e["kind"], e["detail"]) for e in store.events(run_id)]


def test_a_batch_is_applied_once_and_a_stale_segment_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = [["truncate_after", [-1]], ["set_status", ["running", None, None]]]
    rows = [["log_many", [[[1, 8, 0.1, {"train_loss": 5.0}], [2, 16, 0.2, {"train_loss": 4.0}]]]],
            ["log_event", [2, 16, 0.2, "spike", {"z": 9}]]]
    assert ingest(store, Batch("r", 100, 0, first)) is Ingested.APPLIED
    assert ingest(store, Batch("r", 100, 2, rows)) is Ingested.EARLY  # seq 1 not here yet
    assert ingest(store, Batch("r", 100, 1, rows)) is Ingested.APPLIED
    assert ingest(store, Batch("r", 100, 1, rows)) is Ingested.DUPLICATE  # resent: no change
    assert _rows(store)["train_loss"] == [(1, 8, 0.1, 5.0), (2, 16, 0.2, 4.0)]
    assert [e[1] for e in _events(store)] == ["spike"]

    # A new worker resumed from the checkpoint at step 1: its batch 0 drops what came after.
    resumed = [["truncate_after", [1]], ["log_event", [1, 8, 0.1, "resume", {"from_step": 1}]]]
    assert ingest(store, Batch("r", 200, 1, resumed)) is Ingested.EARLY  # opens with batch 0
    assert ingest(store, Batch("r", 200, 0, resumed)) is Ingested.APPLIED
    assert _rows(store)["train_loss"] == [(1, 8, 0.1, 5.0)]
    # The old worker, still going somewhere, cannot write over its successor.
    late = [["log_many", [[[2, 16, 0.2, {"train_loss": 99.0}]]]],
            ["set_status", ["completed", None, {"steps": 2}]]]
    assert ingest(store, Batch("r", 100, 2, late)) is Ingested.STALE
    assert _rows(store)["train_loss"] == [(1, 8, 0.1, 5.0)]
    assert store.run("r")["status"] == "running"
    assert [e[1] for e in _events(store)] == ["resume"]


def test_an_event_key_is_stored_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a = store.log_event("r", 1, 8, 0.1, "spike", {"z": 1}, key="r/1/0/0")
    assert store.log_event("r", 1, 8, 0.1, "spike", {"z": 1}, key="r/1/0/0") is None
    assert a is not None and len(store.events("r")) == 1
    store.log_event("r", 1, 8, 0.1, "spike", {"z": 1})  # unkeyed (the driver's own): appended
    store.log_event("r", 1, 8, 0.1, "spike", {"z": 1})
    assert len(store.events("r")) == 3


def _shipped(cfg: RunConfig, out: Path, storage: Path) -> tuple[Store, Path]:
    """Run "r" of ``cfg`` trained as a remote worker trains it, into the outboxes under
    ``storage``; the driver's store at ``out`` holds the run, nothing ingested yet."""
    store = Store.open(out)
    store.add_run("r", "a", 0, cfg.to_json(), cfg.config_hash)
    train(cfg, "r", Outbox(storage), storage / "runs" / "r")
    return store, storage


def test_a_run_through_the_outbox_stores_what_a_direct_run_stores(tmp_path: Path,
                                                                  articles_data: dict) -> None:
    """The same run trained into a store and into an outbox (then ingested, twice over: a driver
    that died before deleting the files) gives identical rows, bit for bit on CPU."""
    cfg = tiny_config(articles_data, budget={"steps": 20})
    direct = Store.open(tmp_path / "direct")
    direct.add_run("r", "a", 0, cfg.to_json(), cfg.config_hash)
    train(cfg, "r", direct, tmp_path / "direct" / "runs" / "r")

    shipped, storage = _shipped(cfg, tmp_path / "shipped", tmp_path / "storage")
    outbox = Outbox(storage).directory("r")
    files = sorted(outbox.glob("*.json"))
    assert len(files) > 5 and shipped.run("r")["status"] == "pending"  # nothing written yet
    copies = tmp_path / "copies"
    shutil.copytree(outbox, copies)
    counts = read_outbox(shipped, outbox)
    assert counts[Ingested.APPLIED] == len(files) and not list(outbox.glob("*.json"))
    again = read_outbox(shipped, copies)  # every batch delivered a second time
    assert again[Ingested.DUPLICATE] == len(files) and again[Ingested.APPLIED] == 0

    assert _same_but_clock(_rows(shipped), _rows(direct))
    assert [e[:2] for e in _events(shipped)] == [e[:2] for e in _events(direct)]
    assert shipped.run("r")["status"] == direct.run("r")["status"] == "completed"
    assert shipped.run("r")["provenance"]["device"] == "cpu"


def test_an_unreadable_batch_file_is_set_aside_and_said_not_waited_on(
        tmp_path: Path, articles_data: dict) -> None:
    """A batch file that does not parse is retried while it is fresh (a network file system's
    cache may lag), then moved to refused/ (kept) and counted; the batches after it wait, early.
    A resumed run (a new segment) then ingests whole, and the old segment's rest is refused."""
    cfg = tiny_config(articles_data, budget={"steps": 20})
    store, storage = _shipped(cfg, tmp_path / "exp", tmp_path / "storage")
    outbox = Outbox(storage).directory("r")
    files = sorted(outbox.glob("*.json"))
    damaged = files[3]
    damaged.write_text(damaged.read_text()[:40])  # cut short
    counts = read_outbox(store, outbox)  # fresh: retried later, nothing set aside
    assert counts[Ingested.APPLIED] == 3 and counts[Ingested.UNREADABLE] == 0
    assert counts[Ingested.EARLY] == 1 and damaged.exists()
    old = time.time() - ingest_mod.UNREADABLE_GRACE_S - 1
    os.utime(damaged, (old, old))
    counts = read_outbox(store, outbox)
    assert counts[Ingested.UNREADABLE] == 1 and counts[Ingested.EARLY] == len(files) - 4
    assert not damaged.exists() and (outbox / "refused" / f"{damaged.name}.unreadable").exists()
    assert store.run("r")["status"] == "running"  # its end is in a batch still waiting

    # What the driver does (execute.remote): the checkpoints set aside, so that the rerun trains
    # the run again from the start (a resume would leave the set-aside batch's rows missing).
    assert set_aside_checkpoints(storage / "runs" / "r", "test")
    train(cfg, "r", Outbox(storage), storage / "runs" / "r")
    counts = read_outbox(store, outbox, final=True)  # the dead segment no longer holds it up
    assert counts[Ingested.APPLIED] > 5 and counts[Ingested.UNREADABLE] == 0
    assert store.run("r")["status"] == "completed"
    counts = read_outbox(store, outbox)  # superseded by the new segment
    assert counts[Ingested.STALE] == len(files) - 4 and not list(outbox.glob("*.json"))
    assert [r.step for r in store.metrics("r", ["train_loss"])["train_loss"]] == \
        list(range(1, 21))


def _same_but_clock(a: dict, b: dict) -> bool:
    """Equal in step, tokens and value (the losses bit for bit); wall-clock seconds and the
    speed figures derived from them differ between two runs."""
    timed = {"step_time_s", "tokens_per_s", "peak_mem_bytes", "mfu"}
    assert a.keys() == b.keys()
    for name in a:
        pa = [(s, t) + (() if name in timed else (v,)) for s, t, _, v in a[name]]
        pb = [(s, t) + (() if name in timed else (v,)) for s, t, _, v in b[name]]
        assert pa == pb, name
    return True


def test_a_version_2_store_gains_the_marks_and_keeps_its_events(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:2])
    with Store.open(tmp_path) as s:
        s.add_run("r", "a", 0, CONFIG, "h")
        s._conn.execute("INSERT INTO events (run_id, step, tokens, wall_s, kind, detail_json) "
                        "VALUES ('r', 3, 24, 0.3, 'spike', '{}')")
        assert s.schema_version == 2
    monkeypatch.undo()
    with Store.open(tmp_path) as s:
        assert s.schema_version == len(dbmod.MIGRATIONS)
        assert [e["kind"] for e in s.events("r")] == ["spike"]
        assert ingest(s, Batch("r", 5, 0, [["log_event", [4, 32, 0.4, "nan", {}]]])) \
            is Ingested.APPLIED
        assert [e["kind"] for e in s.events("r")] == ["spike", "nan"]
        with pytest.raises(sqlite3.IntegrityError):  # the key is unique
            s._conn.execute("INSERT INTO events (run_id, step, tokens, wall_s, kind, detail_json,"
                            " key) VALUES ('r', 4, 32, 0.4, 'nan', '{}', 'r/5/0/0')")


class _InProcess:
    """A Backend that trains each unit in this process when it is submitted, then damages the
    fourth batch file of every run it trained (when ``damage``): a disk that lost a write."""

    name = "inprocess"

    def __init__(self, damage: bool) -> None:
        self.damage = damage

    def submit(self, unit, job):
        from lmlab.execute.remote import train_unit

        result = train_unit(job)
        for run_id in job.run_ids if self.damage else ():
            victim = sorted(Outbox(Path(job.storage)).directory(run_id).glob("*.json"))[3]
            victim.write_text("{")
        return result

    def adopt(self, record):
        return None

    def done(self, handle) -> bool:
        return True

    def error(self, handle):
        return None, False

    def record(self, handle) -> dict:
        return {"executor": self.name}


def test_the_driver_trains_a_run_with_an_unreadable_batch_again_from_the_start(
        tmp_path: Path, articles_data: dict) -> None:
    """A run whose batch file cannot be read ends failed, saying why, with its checkpoints set
    aside (kept): a resume would leave that batch's rows missing. The rerun trains it from the
    start, and every step's row is there once."""
    from lmlab.execute.pack import Pack
    from lmlab.execute.remote import run_remote
    from lmlab.spec.expand import expand
    from lmlab.spec.load import load_yaml
    from lmlab.spec.schema import Spec
    from test_spec import base_spec, write

    doc = load_yaml(write(tmp_path, base_spec(articles_data)))
    plan = expand(Spec.model_validate(doc.data), doc)
    runs, out, storage = plan.runs[:1], tmp_path / "exp", tmp_path / "storage"
    (run_id,) = [r.run_id for r in runs]

    def units(todo: list) -> list[Pack]:
        return [Pack((r,)) for r in todo]

    assert run_remote(runs, out, _InProcess(damage=True), storage=storage,
                      units=units) == {run_id: "failed"}
    with Store.open(out) as store:
        error = store.run(run_id)["error"]
    assert "could not be read" in error and "trains it again from the start" in error
    run_dir = storage / "runs" / run_id
    assert not (run_dir / "checkpoint.pt").exists() and list(run_dir.glob("checkpoint.pt.damaged-*"))
    assert list((Outbox(storage).directory(run_id) / "refused").glob("*.unreadable"))

    assert run_remote(runs, out, _InProcess(damage=False), storage=storage,
                      units=units) == {run_id: "completed"}
    steps = runs[0].config.budget.tokens // (8 * 32)
    with Store.open(out) as store:
        assert store.run(run_id)["status"] == "completed"
        rows = store.metrics(run_id, ["train_loss"])["train_loss"]
    assert [r.step for r in rows] == list(range(1, steps + 1))
