"""How a run's rows reach the store: in batches, ingested once each, by the one writer.

A run writes through a :class:`RunSink`: the same writes a :class:`~lmlab.store.db.Store` makes
for one run (truncate after the checkpoint, provenance, status, metric rows, events), buffered
and delivered as one :class:`Batch` at a time. Where the batch goes is the only difference
between executors:

- :class:`DirectSink` (``Store.sink(run_id)``, the local executor): :func:`ingest` in this
  process, into the store file on this host.
- :class:`OutboxSink` (``Outbox(storage).sink(run_id)``, Ray and Slurm workers): a file in the
  run's outbox under the shared storage (``runs/<run_id>/outbox/``), written whole and renamed
  into place, never half-visible. The driver, the only writer of the SQLite file, ingests them
  in order (:func:`read_outbox`, ``lmlab.execute.ingest``); SQLite is never written over a
  network file system.

Each batch is keyed by (run, segment, seq). A *segment* is one worker's stretch of a run, from
its start (or resume) to wherever it stops; its id is the time it began in nanoseconds, so a
later worker of the same run (a retry, a resume on another node, a takeover after a lease
expired) has a larger one. ``seq`` counts the segment's batches from 0, and batch 0 opens the
segment: it truncates the run's rows after the checkpoint it resumed from. The store keeps, per
run, the segment it is on and the last seq applied (table ``ingest_marks``), in the transaction
that applies the batch, so:

- a batch sent twice (a retried delivery, a driver that died between committing and deleting
  the file) is a ``duplicate`` and changes nothing;
- a batch of an older segment than the run's current one is ``stale`` and refused: a worker
  whose run was taken over cannot write over its successor;
- a batch that is not the next one of its segment (a gap) is ``early`` and left for later.

Events also carry a key (run, segment, seq, index) with a unique index: a second guard, so that
an event can never be stored twice even by a path that bypasses the marks.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.names import RUNS_DIR

if TYPE_CHECKING:
    from lmlab.store.db import Store

OUTBOX_DIR = "outbox"  # runs/<run_id>/outbox/<segment>-<seq>.json under the storage
REFUSED_DIR = "refused"  # stale batches are moved here, never deleted

# Migration 3 (``store.db.MIGRATIONS``): the marks and the events' key.
SCHEMA_V3 = (
    """
    CREATE TABLE ingest_marks (
        run_id  TEXT PRIMARY KEY REFERENCES runs(run_id),
        segment INTEGER NOT NULL,
        seq     INTEGER NOT NULL
    )
    """,
    "ALTER TABLE events ADD COLUMN key TEXT",
    "CREATE UNIQUE INDEX events_key ON events(key)",
)


class Ingested(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied: nothing changed
    STALE = "stale"  # from a segment the run has moved past: refused
    EARLY = "early"  # not the next batch of its segment: try again once the ones before it came
    # A batch file that does not parse, past the grace a network file system's cache may need:
    # moved to refused/ (kept), so that it is said, not waited on forever.
    UNREADABLE = "unreadable"


# How long a batch file may stay unreadable (an NFS client's stale cache) before it is set aside.
UNREADABLE_GRACE_S = 60.0


@dataclass(frozen=True)
class Batch:
    """A run's writes between two deliveries. ``ops``: ``[method, args]`` pairs naming the
    run-level writes of :class:`~lmlab.store.db.Store` (JSON-able, so a batch is a file)."""

    run_id: str
    segment: int
    seq: int
    ops: list[list[Any]]

    def to_json(self) -> str:
        return json.dumps({"run_id": self.run_id, "segment": self.segment, "seq": self.seq,
                           "ops": self.ops})

    @classmethod
    def from_json(cls, text: str) -> Batch:
        d = json.loads(text)
        return cls(d["run_id"], int(d["segment"]), int(d["seq"]), d["ops"])

    @property
    def file_name(self) -> str:
        # Zero-padded: the names sort in the order the batches were made.
        return f"{self.segment:020d}-{self.seq:09d}.json"


def ingest(store: Store, batch: Batch) -> Ingested:
    """Apply ``batch`` to ``store`` once, in one transaction with its mark (see the module's
    docstring for the rules)."""
    with store._write() as conn:  # the store's own transaction: the writes below join it
        row = conn.execute("SELECT segment, seq FROM ingest_marks WHERE run_id = ?",
                           (batch.run_id,)).fetchone()
        if row is not None and batch.segment < row[0]:
            return Ingested.STALE
        if row is not None and batch.segment == row[0]:
            if batch.seq <= row[1]:
                return Ingested.DUPLICATE
            if batch.seq != row[1] + 1:
                return Ingested.EARLY
        elif batch.seq != 0:  # a new segment opens with its batch 0
            return Ingested.EARLY
        for i, (method, args) in enumerate(batch.ops):
            _apply(store, batch, i, method, args)
        conn.execute(
            "INSERT INTO ingest_marks (run_id, segment, seq) VALUES (?, ?, ?) ON CONFLICT(run_id) "
            "DO UPDATE SET segment = excluded.segment, seq = excluded.seq",
            (batch.run_id, batch.segment, batch.seq))
    return Ingested.APPLIED


def _apply(store: Store, batch: Batch, i: int, method: str, args: list[Any]) -> None:
    run_id = batch.run_id
    if method == "truncate_after":
        store.truncate_after(run_id, *args)
    elif method == "set_provenance":
        store.set_provenance(run_id, *args)
    elif method == "set_status":
        status, error, summary = args
        store.set_status(run_id, status, error=error, summary=summary)
    elif method == "log_many":
        store.log_many(run_id, [(s, t, w, v) for s, t, w, v in args[0]])
    elif method == "log_event":
        store.log_event(run_id, *args, key=f"{run_id}/{batch.segment}/{batch.seq}/{i}")
    else:
        raise ValueError(f"batch {batch.file_name} of run {run_id}: unknown write {method!r}")


@dataclass
class RunSink:
    """Where one run's writes go; subclasses say how a batch is delivered. Writes are buffered
    until :meth:`commit` (the Recorder commits once per log interval, evaluation, event and
    lifecycle change, and always before a checkpoint is written: what a checkpoint says is
    stored must have been delivered)."""

    run_id: str
    segment: int = field(default_factory=time.time_ns)
    seq: int = 0
    ops: list[list[Any]] = field(default_factory=list)

    def truncate_after(self, step: int) -> None:
        self.ops.append(["truncate_after", [int(step)]])

    def set_provenance(self, prov: dict[str, Any]) -> None:
        self.ops.append(["set_provenance", [prov]])

    def set_status(self, status: str, *, error: str | None = None,
                   summary: dict[str, Any] | None = None) -> None:
        self.ops.append(["set_status", [str(status), error, summary]])

    def log_many(self, rows: list[tuple[int, int, float, dict[str, float]]]) -> None:
        if rows:
            self.ops.append(["log_many", [[[int(s), int(t), float(w),
                                            {k: float(v) for k, v in values.items()}]
                                           for s, t, w, values in rows]]])

    def log_metrics(self, step: int, tokens: int, wall_s: float,
                    values: dict[str, float]) -> None:
        self.log_many([(step, tokens, wall_s, values)])

    def log_event(self, step: int, tokens: int, wall_s: float, kind: str,
                  detail: dict[str, Any] | None = None) -> None:
        self.ops.append(["log_event", [int(step), int(tokens), float(wall_s), str(kind),
                                       dict(detail or {})]])

    def commit(self) -> None:
        """Deliver what is buffered as the segment's next batch (nothing when it is empty,
        except batch 0, which opens the segment)."""
        if not self.ops and self.seq > 0:
            return
        batch = Batch(self.run_id, self.segment, self.seq, self.ops)
        self.ops = []
        self.seq += 1
        # A stale batch is refused where it is ingested; its worker is stopped by its lease
        # (lmlab.execute.lease), which the successor took over.
        self.deliver(batch)

    def deliver(self, batch: Batch) -> Ingested | None:
        raise NotImplementedError


@dataclass
class DirectSink(RunSink):
    """Ingests each batch into a store file on this host, in this process."""

    store: Store | None = None

    def deliver(self, batch: Batch) -> Ingested:
        assert self.store is not None
        return ingest(self.store, batch)


@dataclass
class OutboxSink(RunSink):
    """Writes each batch as a file in the run's outbox, for the driver to ingest."""

    directory: Path | None = None

    def deliver(self, batch: Batch) -> None:
        assert self.directory is not None
        write_batch(self.directory, batch)
        return None


class Outbox:
    """The outboxes under a storage location every node reaches: what a remote run writes to
    instead of a store (``train(cfg, run_id, Outbox(storage), ...)``)."""

    def __init__(self, storage: Path) -> None:
        self.storage = Path(storage)

    def directory(self, run_id: str) -> Path:
        return self.storage / RUNS_DIR / run_id / OUTBOX_DIR

    def sink(self, run_id: str) -> OutboxSink:
        return OutboxSink(run_id, directory=self.directory(run_id))


def write_batch(directory: Path, batch: Batch) -> Path:
    """Write ``batch`` under ``directory`` whole: to a temporary name, synced, then renamed (a
    reader never sees part of a batch)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / batch.file_name
    tmp = directory / f".{batch.file_name}.tmp"
    with open(tmp, "w") as f:
        f.write(batch.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_outbox(store: Store, directory: Path, *, final: bool = False) -> dict[Ingested, int]:
    """Ingest the batches waiting in one run's outbox, oldest first, and remove each once the
    store holds it (a stale one is moved to ``refused/``, kept). Stops at the first batch that
    is early (its predecessor is not visible yet). Returns how many batches went each way.

    A file that does not parse is retried on the next pass (a network file system's cache may
    lag) until it has been unreadable for ``UNREADABLE_GRACE_S`` or, with ``final`` (its writer
    has ended), at once: then it is moved to ``refused/<name>.unreadable`` and counted
    ``unreadable``. Its segment is dead: the batches after it can never apply, so they no longer
    hold up a later segment (a resumed run), which makes them stale."""
    counts = dict.fromkeys(Ingested, 0)
    if not directory.is_dir():
        return counts
    dead = dead_segments(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            batch = Batch.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            if final or _age_s(path) >= UNREADABLE_GRACE_S:
                set_aside(directory, path, suffix=UNREADABLE_SUFFIX)
                dead.add(_segment_of(path.name))
                counts[Ingested.UNREADABLE] += 1
            continue
        outcome = ingest(store, batch)
        counts[outcome] += 1
        if outcome is Ingested.EARLY:
            if batch.segment in dead:
                continue
            break
        if outcome is Ingested.STALE:
            set_aside(directory, path)
        else:
            path.unlink()
    return counts


UNREADABLE_SUFFIX = ".unreadable"


def dead_segments(directory: Path) -> set[int]:
    """The segments of this outbox with a batch that could not be read (set aside)."""
    return {_segment_of(p.name) for p in (directory / REFUSED_DIR).glob(f"*{UNREADABLE_SUFFIX}")}


def _segment_of(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def set_aside(directory: Path, path: Path, suffix: str = "") -> Path:
    """Move a batch file the store will not take into the outbox's ``refused/`` (never deleted)."""
    (directory / REFUSED_DIR).mkdir(exist_ok=True)
    target = directory / REFUSED_DIR / (path.name + suffix)
    os.replace(path, target)
    return target


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def sink_for(records: Store | Outbox | RunSink, run_id: str) -> RunSink:
    """Where run ``run_id`` writes, given what a worker was handed: a store on this host (the
    local executor), the outboxes of a shared storage (a remote worker), or a sink itself."""
    if isinstance(records, RunSink):
        return records
    if isinstance(records, Outbox):
        return records.sink(run_id)
    return DirectSink(run_id, store=records)
