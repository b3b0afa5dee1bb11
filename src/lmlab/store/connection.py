"""The SQLite connection a :class:`~lmlab.store.db.Store` talks through, and what it says when
the file under it is damaged.

Every statement runs on one cursor class that turns SQLite's "corrupt" and "not a database"
errors, whether met executing or fetching, into a :class:`StoreDamaged` user error naming the
file and what to do (``lmlab doctor``). The damaged file itself is never changed. A WAL file found
without its database is refused too: a new store beside it would bury its writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmlab.errors import UserError

# Writers wait this long for the lock before giving up. Runs write once per log interval, so a
# wait of more than a few milliseconds means something is badly wrong; a minute is a safe margin
# on a loaded machine (many runs, slow network file systems).
BUSY_TIMEOUT_S = 60.0
# SQLite's result codes for a file that is damaged (CORRUPT) or is not a database (NOTADB).
DAMAGE = {"SQLITE_CORRUPT": "damaged", "SQLITE_NOTADB": "not an SQLite database"}


class StoreDamaged(UserError):
    """The store file cannot be read as a whole; nothing was written to it."""


def damaged(path: Path, what: str, detail: str) -> StoreDamaged:
    directory = path.parent
    return StoreDamaged(
        f"{what} ({detail}): it was left as it is. `lmlab doctor {directory}` checks it, and "
        f"`lmlab doctor {directory} --recover` copies what can still be read into a new store "
        "(keeping the damaged file aside)", file=str(path))


def _raise_if_damaged(error: sqlite3.DatabaseError, path: Path) -> None:
    what = DAMAGE.get(getattr(error, "sqlite_errorname", ""))
    if what is not None:
        raise damaged(path, what, str(error)) from None


class _Cursor(sqlite3.Cursor):
    """A cursor whose damaged-file errors, when executing or fetching, are StoreDamaged."""

    connection: Connection

    def execute(self, sql: str, parameters: Any = ()) -> _Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as e:
            _raise_if_damaged(e, self.connection.store_path)
            raise

    def executemany(self, sql: str, parameters: Iterable[Any]) -> _Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as e:
            _raise_if_damaged(e, self.connection.store_path)
            raise

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as e:
            _raise_if_damaged(e, self.connection.store_path)
            raise

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as e:
            _raise_if_damaged(e, self.connection.store_path)
            raise

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.DatabaseError as e:
            _raise_if_damaged(e, self.connection.store_path)
            raise


class Connection(sqlite3.Connection):
    """The store's connection: every statement runs on a :class:`_Cursor`."""

    store_path: Path

    def execute(self, sql: str, parameters: Any = ()) -> _Cursor:  # type: ignore[override]
        return self.cursor(_Cursor).execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any]) -> _Cursor:  # type: ignore[override]
        return self.cursor(_Cursor).executemany(sql, parameters)


def wal_of(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def check_not_orphaned_wal(path: Path) -> None:
    """Refuse a store whose database file is gone but whose WAL is still there."""
    wal = wal_of(path)
    if not path.exists() and wal.is_file() and wal.stat().st_size > 0:
        raise UserError(
            f"a write-ahead log without its database ({path.name} is missing): it holds the "
            "database's latest writes, so lmlab will not start a new store beside it. Put "
            f"{path.name} back beside it (the two belong together), or move {wal.name} away to "
            "start afresh", file=str(wal))


def connect(path: Path, *, read_only: bool = False) -> Connection:
    """A connection to the store file at ``path``, set up for many writer processes; with
    ``read_only``, opened ``mode=ro`` (SQLite refuses every write) and set up no further."""
    check_not_orphaned_wal(path)
    # isolation_level=None: the sqlite3 module opens no transactions behind our back; every
    # write says BEGIN IMMEDIATE ... COMMIT itself.
    if read_only:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=Connection)
        conn.store_path = path
        return conn
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=Connection)
    conn.store_path = path
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL syncs the WAL on every commit. Commits are rare (one per log interval), and a
        # resumed run relies on every row up to its checkpoint being on disk.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn
