"""``lmlab doctor DIR``: is an experiment's store whole, and if not, what can still be read.

The damaged file is never written. Doctor works on a copy of it (with its WAL, which holds the
latest committed writes) and runs SQLite's integrity check there. ``recover`` then copies every
row that can still be read into a new store, table by table, and where a read fails, key range
by key range (bisecting down to single keys): a damaged page costs the rows on it, not the table.
The new store is checked, the damaged file and its WAL are moved aside under a
``lmlab.sqlite.damaged-<time>`` name, and the new store takes their place. Each run that lost
rows gets a ``rows_lost`` event saying which, so no incomplete curve passes for a whole one.

Not recoverable here: a file whose header is gone (SQLite cannot open it at all). Its pages may
still hold data that the ``sqlite3`` command-line shell's ``.recover`` can dig out.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import UserError
from lmlab.names import (
    EVAL_KEYS,
    GRAD_NORM,
    LR,
    PEAK_MEM,
    PEAK_MEM_RESERVED,
    RESULT_PLAN,
    STEP_TIME,
    STORE_FILE,
    TEST,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL,
    Event,
    eval_metric,
)
from lmlab.store.connection import DAMAGE, check_not_orphaned_wal, wal_of
from lmlab.store.db import MIGRATIONS, Store, upgrade

INTEGRITY_LIMIT = 50  # integrity-check messages kept
MAX_QUERIES = 200_000  # reads tried per table before the rest of a failing range is given up
KNOWN_METRICS = (TRAIN_LOSS, GRAD_NORM, LR, STEP_TIME, TOKENS_PER_S, PEAK_MEM, PEAK_MEM_RESERVED,
                 *(eval_metric(s, k) for s in (VAL, TEST) for k in EVAL_KEYS))
ROWID_TABLES = ("meta", "runs", "results", "events")


@dataclass
class Diagnosis:
    store: Path
    problems: list[str]  # SQLite's integrity-check messages; empty when the store is whole
    schema_version: int | None = None
    runs: int | None = None

    @property
    def whole(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """What `lmlab doctor` says about it."""
        if self.whole:
            return [f"{self.store}: ok (integrity check passed; schema v{self.schema_version}, "
                    f"{self.runs} runs)"]
        return [f"{self.store}: damaged. SQLite's integrity check says:",
                *(f"  {problem}" for problem in self.problems[:10])]


@dataclass
class Recovery:
    store: Path  # the new store, in the damaged one's place
    kept: list[Path]  # the damaged file and its WAL, moved aside
    copied: dict[str, int]  # table -> rows copied
    lost: dict[str, list[str]] = field(default_factory=dict)  # what -> unreadable key ranges

    def lines(self) -> list[str]:
        """What `lmlab doctor --recover` says it did."""
        out = [f"recovered into {self.store}: " + ", ".join(
            f"{table} {n:,} rows" for table, n in self.copied.items())]
        for what, ranges in self.lost.items():
            out.append(f"  unreadable: {what} keys " + ", ".join(ranges[:8])
                       + (" ..." if len(ranges) > 8 else ""))
        if self.lost:
            out.append("runs that lost rows carry a rows_lost event (lmlab status shows it)")
        out.append("the damaged store is kept as " + ", ".join(str(p) for p in self.kept))
        return out


def diagnose(directory: Path) -> Diagnosis:
    """SQLite's integrity check, on a copy. A UserError when there is nothing to check or
    nothing in the file can be read."""
    store = store_file(directory)
    with _working_copy(store) as copy, closing(sqlite3.connect(copy)) as conn:
        try:
            rows = conn.execute(f"PRAGMA integrity_check({INTEGRITY_LIMIT})").fetchall()
        except sqlite3.DatabaseError as e:
            _refuse_unreadable(store, e)
            return Diagnosis(store, [str(e)])
        problems = [] if rows == [("ok",)] else [r[0] for r in rows]
        return Diagnosis(store, problems, _version(conn), _count(conn, "runs"))


def recover(directory: Path) -> Recovery:
    """Copy what can be read into a new store, then put it in the damaged one's place (the
    damaged file is moved aside, never changed). The caller holds the directory's lock."""
    store = store_file(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new = store.with_name(f"{STORE_FILE}.recovered-{stamp}")
    with _working_copy(store) as copy, closing(sqlite3.connect(copy)) as src:
        try:
            version = _version(src) or max(m.version for m in MIGRATIONS)
        except sqlite3.DatabaseError as e:
            _refuse_unreadable(store, e)
            raise
        _create_schema(new, version)
        salvage = _Salvage(src)
        with closing(sqlite3.connect(new, isolation_level=None)) as dst:
            dst.execute("BEGIN IMMEDIATE")
            for table in ROWID_TABLES:
                salvage.rowid_table(table, dst)
            salvage.metrics(dst)
            dst.execute("COMMIT")
    with Store(new) as recovered:  # migrates an older store the rest of the way
        _record_losses(recovered, salvage, store.name)
    with closing(sqlite3.connect(new)) as conn:
        check = conn.execute("PRAGMA integrity_check(1)").fetchone()[0]
    if check != "ok":
        raise UserError(f"the recovered copy {new.name} fails its own check ({check}); the "
                        "damaged store was left in place", file=str(store))
    kept = []
    for path, suffix in ((store, ""), (wal_of(store), "-wal"),
                         (store.with_name(store.name + "-shm"), "-shm")):
        if path.exists():
            target = store.with_name(f"{STORE_FILE}.damaged-{stamp}{suffix}")
            path.rename(target)
            kept.append(target)
    new.rename(store)
    return Recovery(store=store, kept=kept, copied=salvage.copied, lost=salvage.lost_ranges())


# ---- reading what can be read -----------------------------------------------------------------

class _Salvage:
    """Rows copied from a damaged database: a range read that fails is split in two and each
    half read again, down to single keys, so only the keys on damaged pages are lost."""

    def __init__(self, src: sqlite3.Connection) -> None:
        self.src = src
        self.copied: dict[str, int] = {}
        self.lost: dict[str, list[tuple[int, int]]] = {}  # "table", "metrics run/name" -> keys
        self.queries = 0

    def _read(self, sql: str, params: tuple, lo: int, hi: int, what: str) -> Iterator[tuple]:
        """Rows of ``sql`` (which takes ``params``, then the key range lo..hi)."""
        pending = [(lo, hi)]
        while pending:
            a, b = pending.pop()
            self.queries += 1
            try:
                rows = self.src.execute(sql, (*params, a, b)).fetchall()
            except sqlite3.DatabaseError:
                if a == b or self.queries > MAX_QUERIES:
                    self.lost.setdefault(what, []).append((a, b))
                else:
                    mid = (a + b) // 2
                    pending += [(mid + 1, b), (a, mid)]
                continue
            yield from rows

    def _bounds(self, sql: str, params: tuple = ()) -> tuple[int, int] | None:
        try:
            lo, hi = self.src.execute(sql, params).fetchone()
        except sqlite3.DatabaseError:
            return 0, 2**62  # the edges are unreadable too: search the whole key space
        return None if lo is None else (int(lo), int(hi))

    def rowid_table(self, table: str, dst: sqlite3.Connection) -> None:
        columns = [r[1] for r in dst.execute(f"PRAGMA table_info({table})")]
        # A column that is the INTEGER PRIMARY KEY (events.id) is the rowid already.
        aliased = any(r[5] and r[2].upper() == "INTEGER" for r in
                      dst.execute(f"PRAGMA table_info({table})"))
        keys = columns if aliased else ["rowid", *columns]
        bounds = self._bounds(f"SELECT min(rowid), max(rowid) FROM {table}")
        if bounds is None:
            self.copied[table] = 0
            return
        rows = self._read(f"SELECT {', '.join(keys)} FROM {table} WHERE rowid BETWEEN ? AND ?",
                          (), *bounds, table)
        # meta: the old creation time wins over the new store's; its version row is its own.
        conflict = "REPLACE" if table == "meta" else "IGNORE"
        insert = (f"INSERT OR {conflict} INTO {table} ({', '.join(keys)}) "
                  f"VALUES ({', '.join('?' * len(keys))})")
        if table == "meta":
            rows = (r for r in rows if r[keys.index("key")] != "schema_version")
        self.copied[table] = dst.executemany(insert, rows).rowcount

    def _run_ids(self, dst: sqlite3.Connection) -> list[str]:
        """Runs with metrics to look for: the ones recovered, those events name, and those the
        stored plan lists (a run whose own row was lost keeps its metrics)."""
        ids = [r[0] for r in dst.execute("SELECT run_id FROM runs ORDER BY rowid")]
        ids += [r[0] for r in dst.execute("SELECT DISTINCT run_id FROM events WHERE run_id "
                                          "IS NOT NULL")]
        plan = dst.execute("SELECT value_json FROM results WHERE key = ?", (RESULT_PLAN,)).fetchone()
        ids += [r["run_id"] for r in json.loads(plan[0]).get("runs", [])] if plan else []
        return list(dict.fromkeys(ids))

    def _names(self, run_id: str, seen: set[str]) -> list[str]:
        """The metric names of one run, key by key (each a seek, so a damaged page on the way
        costs only what comes after it; then the names lmlab logs and other runs had)."""
        names: list[str] = []
        last = ""
        while True:
            try:
                row = self.src.execute("SELECT name FROM metrics WHERE run_id = ? AND name > ? "
                                       "ORDER BY name LIMIT 1", (run_id, last)).fetchone()
            except sqlite3.DatabaseError:
                return list(dict.fromkeys([*names, *KNOWN_METRICS, *sorted(seen)]))
            if row is None:
                return names
            names.append(last := row[0])

    def metrics(self, dst: sqlite3.Connection) -> None:
        seen: set[str] = set()
        total = 0
        for run_id in self._run_ids(dst):
            for name in self._names(run_id, seen):
                seen.add(name)
                bounds = self._bounds("SELECT min(step), max(step) FROM metrics WHERE run_id = ? "
                                      "AND name = ?", (run_id, name))
                if bounds is None:
                    continue
                rows = self._read("SELECT run_id, step, tokens, wall_s, name, value FROM metrics "
                                  "WHERE run_id = ? AND name = ? AND step BETWEEN ? AND ?",
                                  (run_id, name), *bounds, f"metrics {run_id}/{name}")
                total += dst.executemany(
                    "INSERT OR IGNORE INTO metrics (run_id, step, tokens, wall_s, name, value) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows).rowcount
        self.copied["metrics"] = total

    def lost_ranges(self) -> dict[str, list[str]]:
        return {what: _ranges(keys) for what, keys in sorted(self.lost.items())}


def _ranges(spans: list[tuple[int, int]]) -> list[str]:
    """[(3, 3), (4, 5), (9, 9)] -> ["3-5", "9"]: unreadable keys, merged."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in out]


def _record_losses(store: Store, salvage: _Salvage, damaged_name: str) -> None:
    """A ``rows_lost`` event on every run whose metrics lost keys; one for the experiment when
    whole tables' rows (runs, events, results) are missing."""
    by_run: dict[str, dict[str, list[str]]] = {}
    rest: dict[str, list[str]] = {}
    for what, ranges in salvage.lost_ranges().items():
        if what.startswith("metrics "):
            run_id, name = what.removeprefix("metrics ").split("/", 1)
            by_run.setdefault(run_id, {})[name] = ranges
        else:
            rest[what] = ranges
    known = {r["run_id"] for r in store.runs()}
    for run_id, names in by_run.items():
        detail = {"unreadable_steps": names, "damaged_store": damaged_name}
        if run_id in known:
            store.log_event(run_id, 0, 0, 0.0, Event.ROWS_LOST, detail)
        else:
            rest.setdefault("runs", []).append(run_id)
    if rest:
        store.log_event(None, 0, 0, 0.0, Event.ROWS_LOST,
                        {"unreadable_rowids": rest, "damaged_store": damaged_name})


# ---- files ------------------------------------------------------------------------------------

def store_file(directory: Path) -> Path:
    """``directory``'s store file; a UserError when there is none (or only its WAL)."""
    store = Path(directory) / STORE_FILE
    check_not_orphaned_wal(store)
    if not store.is_file():
        raise UserError(f"no lmlab results here ({STORE_FILE} missing)", file=str(directory))
    return store


@contextmanager
def _working_copy(store: Path) -> Iterator[Path]:
    """The store and its WAL copied beside it (same disk), removed afterwards: SQLite may write
    to a database it opens (replaying its WAL), and the damaged file must stay as it is."""
    with tempfile.TemporaryDirectory(dir=store.parent, prefix=".doctor-") as tmp:
        copy = Path(tmp) / STORE_FILE
        shutil.copyfile(store, copy)
        if wal_of(store).exists():
            shutil.copyfile(wal_of(store), wal_of(copy))
        yield copy


def _create_schema(path: Path, version: int) -> None:
    """An empty store file at schema ``version`` (an older store's rows go into the schema they
    were written for; opening it with :class:`Store` then migrates it)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        upgrade(conn, path, version)
        conn.execute("COMMIT")


def _refuse_unreadable(store: Path, error: sqlite3.DatabaseError) -> None:
    if getattr(error, "sqlite_errorname", "") == "SQLITE_NOTADB":
        raise UserError(f"{DAMAGE['SQLITE_NOTADB']} ({error}): nothing in it can be read from "
                        "here, and it was left as it is. If it held an lmlab store, the sqlite3 "
                        f"shell's `.recover` may still find rows in it (sqlite3 {store} .recover)",
                        file=str(store)) from None


def _version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorname", "") == "SQLITE_NOTADB":
            raise
        return None
    return int(row[0]) if row else None


def _count(conn: sqlite3.Connection, table: str) -> int | None:
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError:
        return None
