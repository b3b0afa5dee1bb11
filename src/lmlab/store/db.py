"""The experiment store: one SQLite file per experiment directory (``DIR/lmlab.sqlite``).

Every run of an experiment is its own process, and all of them write to the same file at once,
so the connection is set up for that: WAL journaling (readers never block the writer and the
report can read while runs train), a generous busy timeout (writers queue instead of failing),
and every write in one ``BEGIN IMMEDIATE`` transaction. IMMEDIATE takes the write lock up front;
a deferred transaction that reads first and then writes can fail with SQLITE_BUSY without
waiting, because SQLite cannot upgrade a reader whose snapshot is stale.

Nothing a user does loses data: there is no DROP anywhere, and the only DELETE is
:meth:`Store.truncate_after`, which removes the rows a killed run is about to write again after
resuming from its last checkpoint.

Non-finite metric values: SQLite turns a bound NaN into NULL, while ``inf`` and ``-inf`` are
kept as REAL. The metric ``value`` column is otherwise never NULL, so a NULL read back *is* a NaN
and is returned as ``float("nan")``; infinities round-trip unchanged.

A damaged file (not a database at all, or with damaged pages) is a user error from whichever
statement meets the damage first (:mod:`lmlab.store.connection`); ``lmlab doctor``
(:mod:`lmlab.store.doctor`) checks it and copies what can be read into a new store.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from lmlab.config import LEGACY_CADENCE_KEYS, upgrade_run_tree
from lmlab.errors import UserError
from lmlab.names import RESULT_SPEC, STATUSES, STORE_FILE, TERMINAL, Role, Status
from lmlab.store.codec import dumps as _dumps
from lmlab.store.codec import loads as _loads
from lmlab.store.connection import check_not_orphaned_wal, connect, damaged
from lmlab.store.ingest import SCHEMA_V3


class Migration(NamedTuple):
    """One schema step. ``apply`` runs inside the migration transaction; it must not commit."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _statements(*sql: str) -> Callable[[sqlite3.Connection], None]:
    """A migration made of plain SQL statements.

    Statements run one at a time with ``execute``: ``executescript`` would COMMIT the open
    transaction first and break the all-or-nothing migration.
    """

    def apply(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return apply


_STATUS_CHECK = ", ".join(f"'{s}'" for s in STATUSES)

_V1 = _statements(
    f"""
    CREATE TABLE runs (
        run_id          TEXT PRIMARY KEY,
        arm             TEXT NOT NULL,
        seed            INTEGER NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ({_STATUS_CHECK})),
        config_json     TEXT NOT NULL,
        config_hash     TEXT NOT NULL,
        provenance_json TEXT,
        summary_json    TEXT,
        error           TEXT,
        created_at      TEXT NOT NULL,
        started_at      TEXT,
        ended_at        TEXT,
        updated_at      TEXT NOT NULL
    )
    """,
    # WITHOUT ROWID clusters the rows by (run_id, name, step): reading one curve in step order,
    # the report's main access pattern, is a single range scan.
    """
    CREATE TABLE metrics (
        run_id  TEXT NOT NULL REFERENCES runs(run_id),
        step    INTEGER NOT NULL,
        tokens  INTEGER NOT NULL,
        wall_s  REAL NOT NULL,
        name    TEXT NOT NULL,
        value   REAL,
        PRIMARY KEY (run_id, name, step)
    ) WITHOUT ROWID
    """,
    # run_id may be NULL: an event about the experiment as a whole (a failed preflight, say).
    """
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        run_id      TEXT REFERENCES runs(run_id),
        step        INTEGER NOT NULL,
        tokens      INTEGER NOT NULL,
        wall_s      REAL NOT NULL,
        kind        TEXT NOT NULL,
        detail_json TEXT NOT NULL
    )
    """,
    "CREATE INDEX events_run_step ON events(run_id, step)",
    "CREATE INDEX events_kind ON events(kind)",
    """
    CREATE TABLE results (
        key        TEXT PRIMARY KEY,
        value_json TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )
    """,
)


def _v2(conn: sqlite3.Connection) -> None:
    """lmlab 0.2 names a run's sections as a spec names them: ``eval`` became ``evaluation``
    (with ``diagnostics`` inside it) and the log / checkpoint cadences moved to ``cadence``."""
    from lmlab.identity import digest

    rows = conn.execute("SELECT run_id, config_json FROM runs").fetchall()
    for run_id, text in rows:
        tree = json.loads(text)
        upgraded = upgrade_run_tree(tree)
        if upgraded is tree:
            continue
        conn.execute("UPDATE runs SET config_json = ?, config_hash = ? WHERE run_id = ?",
                     (json.dumps(upgraded, sort_keys=True), digest(upgraded), run_id))
    # The stored spec: its cadences moved out of ``evaluation`` (``Spec`` reads either shape).
    row = conn.execute("SELECT value_json FROM results WHERE key = ?", (RESULT_SPEC,)).fetchone()
    record = _loads(row[0]) if row else None
    evaluation = (record or {}).get("spec", {}).get("evaluation") or {}
    moved = {k: evaluation.pop(k) for k in LEGACY_CADENCE_KEYS if k in evaluation}
    if moved:
        record["spec"]["cadence"] = {**moved, **(record["spec"].get("cadence") or {})}
        conn.execute("UPDATE results SET value_json = ? WHERE key = ?",
                     (_dumps(record), RESULT_SPEC))


# Applied in order on open; a database records the last one it has seen in meta.schema_version.
# Append new versions here, never edit an applied one: existing experiment files depend on it.
MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema: runs, metrics, events, results", _V1),
    Migration(2, "run configs: eval -> evaluation (+ diagnostics), cadence", _v2),
    Migration(3, "ingestion: each run's batch marks, events keyed", _statements(*SCHEMA_V3)),
    # A run's role (names.Role: a nuisance sweep's tuning runs beside the confirmation runs) and
    # a tuning run's nuisance values; every run of an older store is a confirmation run.
    Migration(4, "runs: role (tuning | confirmation) and nuisance point", _statements(
        "ALTER TABLE runs ADD COLUMN role TEXT NOT NULL DEFAULT 'confirmation' "
        f"CHECK (role IN ({', '.join(repr(str(r)) for r in Role)}))",
        "ALTER TABLE runs ADD COLUMN point_json TEXT")),
]


def upgrade(conn: sqlite3.Connection, path: Path, to: int) -> None:
    """Apply the migrations from the database's version up to ``to``, inside the caller's
    transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    current = int(row[0]) if row else 0
    latest = max(m.version for m in MIGRATIONS)
    if current > latest:
        raise UserError(
            f"this experiment database has schema version {current}, but this lmlab "
            f"only knows up to {latest}; upgrade lmlab to read it", file=str(path))
    for migration in sorted(MIGRATIONS, key=lambda m: m.version)[current:to]:
        migration.apply(conn)
    if current < to:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(to),))
        if current == 0:
            conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (_now(),))


class MetricRow(NamedTuple):
    """One logged value with its three possible x-axes."""

    step: int
    tokens: int
    wall_s: float
    value: float


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _value_out(value: float | None) -> float:
    return math.nan if value is None else float(value)


class Store:
    """The records of one experiment. Open one per process; it is not shared between threads.

    ``Store(path)`` opens (or creates) the SQLite file at ``path``; an existing directory means
    the ``lmlab.sqlite`` inside it. ``Store.open(dir)`` also creates the directory.
    ``read_only=True`` (``lmlab serve`` beside a live sweep): an existing file, opened with
    ``mode=ro`` so that SQLite refuses every write, and not migrated (that writes); under WAL
    it reads committed snapshots and no writer ever waits for it.
    """

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILE
        self.path = path
        self._conn = connect(path, read_only=read_only)
        if read_only:
            return
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, directory: Path | str) -> Store:
        """The store of the experiment in ``directory``, creating both if needed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / STORE_FILE)

    @classmethod
    def existing(cls, directory: Path | str) -> Store:
        """The store of the experiment in ``directory``; a UserError when there is none (a
        command that only reads must not create an empty experiment)."""
        path = Path(directory) / STORE_FILE
        check_not_orphaned_wal(path)
        if not path.is_file():
            raise UserError(f"no lmlab results here ({STORE_FILE} missing)", file=str(directory))
        return cls(path)

    def check_intact(self) -> None:
        """SQLite's quick check over every page: a command that is about to write (``lmlab run``,
        ``train``) refuses a damaged store up front instead of meeting the damage halfway."""
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise damaged(self.path, "damaged", "; ".join(problems[:3]))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- transactions and schema ------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write, all or nothing; writes inside it join it (an ingested batch)."""
        if self._conn.in_transaction:
            yield self._conn
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT, so the connection is never left mid-transaction.
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        migrations = sorted(MIGRATIONS, key=lambda m: m.version)
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise RuntimeError(f"migration versions must be 1, 2, ... without gaps: {versions}")
        # One transaction for the whole upgrade: two processes opening a fresh file at once
        # serialise here, and the second finds the schema already in place.
        with self._write() as conn:
            upgrade(conn, self.path, versions[-1])

    @property
    def schema_version(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0])

    # -- runs --------------------------------------------------------------------------------

    def add_run(self, run_id: str, arm: str, seed: int, config_json: str, config_hash: str,
                status: str = Status.PENDING, *, role: str = Role.CONFIRMATION,
                point: Mapping[str, Any] | None = None) -> bool:
        """Register a run (``role``, ``point``: a tuning run and its nuisance values). An
        existing run is left untouched (re-planning an experiment must not reset finished
        runs); returns whether a row was inserted."""
        _check_status(status)
        Role(role)
        # Decoded by runs() and the report; reject a broken config now, not at report time.
        json.loads(config_json)
        now = _now()
        with self._write() as conn:
            values = {"run_id": run_id, "arm": arm, "seed": int(seed), "status": status,
                      "config_json": config_json, "config_hash": config_hash,
                      "created_at": now, "updated_at": now}
            if role != Role.CONFIRMATION or point is not None:  # else the columns' defaults
                values.update(role=str(role), point_json=_dumps(dict(point or {})))
            cur = conn.execute(
                f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))}) "
                "ON CONFLICT(run_id) DO NOTHING", tuple(values.values()))
            return cur.rowcount == 1

    def set_status(self, run_id: str, status: str, *, error: str | None = None,
                   summary: Mapping[str, Any] | None = None) -> None:
        """Move a run to ``status``.

        ``started_at`` is set the first time a run is 'running' and kept across resumes;
        ``ended_at`` is set on a terminal status and cleared when the run runs again. ``error``
        always describes the latest status (a successful rerun clears an old failure);
        ``summary`` replaces the stored one only when given.
        """
        _check_status(status)
        now = _now()
        terminal = status in TERMINAL
        with self._write() as conn:
            cur = conn.execute(
                """
                UPDATE runs SET
                    status = ?,
                    error = ?,
                    summary_json = COALESCE(?, summary_json),
                    started_at = CASE WHEN ? = 'running' AND started_at IS NULL THEN ?
                                      ELSE started_at END,
                    ended_at = CASE WHEN ? THEN ? ELSE NULL END,
                    updated_at = ?
                WHERE run_id = ?
                """,
                (status, error, None if summary is None else _dumps(summary), status, now,
                 terminal, now, now, run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run {run_id!r} in {self.path}")

    def set_provenance(self, run_id: str, prov: Mapping[str, Any]) -> None:
        """Record where and with what a run ran (see :func:`lmlab.store.provenance.capture`)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE runs SET provenance_json = ?, updated_at = ? WHERE run_id = ?",
                (_dumps(prov), _now(), run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run {run_id!r} in {self.path}")

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run with config, provenance and summary decoded; None if unknown."""
        cur = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return None if row is None else _run_dict(cur.description, row)

    def runs(self, *, arm: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """All runs in the order they were added (the plan's order), optionally filtered."""
        cur = self._conn.execute(
            "SELECT * FROM runs WHERE (?1 IS NULL OR arm = ?1) AND (?2 IS NULL OR status = ?2) "
            "ORDER BY rowid", (arm, status))
        return [_run_dict(cur.description, row) for row in cur.fetchall()]

    # -- metrics and events ------------------------------------------------------------------

    def log_metrics(self, run_id: str, step: int, tokens: int, wall_s: float,
                    values: Mapping[str, float]) -> None:
        """Values of one step, all sharing its step, tokens seen and wall-clock seconds."""
        self.log_many(run_id, [(step, tokens, wall_s, values)])

    def log_many(self, run_id: str,
                 rows: Iterable[tuple[int, int, float, Mapping[str, float]]]) -> None:
        """Many steps in one transaction (the loop buffers a log interval and writes once).

        A (run, name, step) already stored is overwritten: a resumed run that re-logs a step
        replaces the value instead of failing or duplicating it.
        """
        params = [
            (run_id, int(step), int(tokens), float(wall_s), name, float(value))
            for step, tokens, wall_s, values in rows
            for name, value in values.items()
        ]
        if not params:
            return
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO metrics (run_id, step, tokens, wall_s, name, value) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, name, step) DO UPDATE SET "
                "tokens = excluded.tokens, wall_s = excluded.wall_s, value = excluded.value",
                params)

    def log_event(self, run_id: str | None, step: int, tokens: int, wall_s: float, kind: str,
                  detail: Mapping[str, Any] | None = None, *, key: str | None = None) -> int | None:
        """Something that happened ('nan', 'divergence', 'spike', 'oom', 'resume', ...); ``run_id``
        None: the experiment as a whole. ``key`` (an ingested event's, ``lmlab.store.ingest``):
        stored once whatever happens. Returns the event's id."""
        with self._write() as conn:
            row = conn.execute(
                "INSERT INTO events (run_id, step, tokens, wall_s, kind, detail_json, key) VALUES "
                "(?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (run_id, int(step), int(tokens), float(wall_s), kind, _dumps(dict(detail or {})),
                 key)).fetchone()
        return row[0] if row else None  # None: the event with this key was stored already

    def truncate_after(self, run_id: str, step: int) -> tuple[int, int]:
        """Forget a run's metrics and events after ``step``, its last checkpoint.

        A killed run logged past its last checkpoint; resuming replays those steps, so their
        rows are removed first and every step ends up stored exactly once. Returns the number
        of (metric, event) rows removed.
        """
        with self._write() as conn:
            n_metrics = conn.execute(
                "DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, int(step))).rowcount
            n_events = conn.execute(
                "DELETE FROM events WHERE run_id = ? AND step > ?", (run_id, int(step))).rowcount
        return n_metrics, n_events

    def metrics(self, run_id: str,
                names: Sequence[str] | None = None) -> dict[str, list[MetricRow]]:
        """Curves of one run, each in step order: {name: [(step, tokens, wall_s, value)]}.

        Names asked for but never logged are absent from the result.
        """
        sql = "SELECT name, step, tokens, wall_s, value FROM metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if names is not None:
            if not names:
                return {}
            sql += f" AND name IN ({', '.join('?' * len(names))})"
            params.extend(names)
        out: dict[str, list[MetricRow]] = {}
        for name, step, tokens, wall_s, value in self._conn.execute(
                sql + " ORDER BY name, step", params):
            out.setdefault(name, []).append(MetricRow(step, tokens, wall_s, _value_out(value)))
        return out

    def metric_names(self, run_id: str) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,))]

    def last_metric(self, run_id: str, name: str) -> float | None:
        """The value at the highest logged step (NaN if that was NaN); None if never logged."""
        row = self._conn.execute(
            "SELECT value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step DESC LIMIT 1",
            (run_id, name)).fetchone()
        return None if row is None else _value_out(row[0])

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Events in the order they were logged, optionally of one run and/or one kind."""
        cur = self._conn.execute(
            "SELECT id, run_id, step, tokens, wall_s, kind, detail_json FROM events "
            "WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR kind = ?2) ORDER BY id",
            (run_id, kind))
        return [
            {"id": id_, "run_id": rid, "step": step, "tokens": tokens, "wall_s": wall_s,
             "kind": k, "detail": _loads(detail)}
            for id_, rid, step, tokens, wall_s, k, detail in cur.fetchall()
        ]

    def event_counts(self, run_id: str) -> dict[str, int]:
        """{kind: number of events} for one run; kinds that never happened are absent."""
        return dict(self._conn.execute(
            "SELECT kind, COUNT(*) FROM events WHERE run_id = ? GROUP BY kind ORDER BY kind",
            (run_id,)).fetchall())

    # -- experiment-level results ------------------------------------------------------------

    def put_result(self, key: str, value: Any) -> None:
        """Store a JSON-able value under ``key`` (the spec, the plan, preflight, analyses),
        replacing the previous value of that key."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO results (key, value_json, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value_json = excluded.value_json, "
                "updated_at = excluded.updated_at",
                (key, _dumps(value), _now()))

    def get_result(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute(
            "SELECT value_json FROM results WHERE key = ?", (key,)).fetchone()
        return default if row is None else _loads(row[0])

    def result_keys(self, prefix: str = "") -> list[str]:
        """Stored result keys starting with ``prefix``, sorted."""
        # substr instead of LIKE: keys may contain '%' or '_'.
        return [r[0] for r in self._conn.execute(
            "SELECT key FROM results WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix))]


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}")


_JSON_COLUMNS = {"config_json": "config", "provenance_json": "provenance",
                 "summary_json": "summary", "point_json": "point"}


def _run_dict(description: Sequence[Sequence[Any]], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column, value in zip((d[0] for d in description), row, strict=True):
        if column in _JSON_COLUMNS:
            out[_JSON_COLUMNS[column]] = _loads(value)
        else:
            out[column] = value
    return out
