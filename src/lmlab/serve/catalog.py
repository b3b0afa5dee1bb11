"""The experiments under the served directory, read read-only and cached until their store
changes.

A dashboard polls every few seconds, most experiments under a lab directory are finished, and
loading one reads every row it holds, so each experiment is loaded once and reloaded only when
its store has changed: the ``Fingerprint`` of its files (a commit appends to the WAL, a
checkpoint rewrites the main file) plus every run's status and update time (exact for status
changes, which matter most). A reload reads again only the runs that may have changed
(:class:`_ReusingStore`).

Every read goes through a read-only store (``Store(..., read_only=True)``): the server cannot
write, lock or migrate a store that a sweep is writing. (SQLite's WAL mode may create the empty
``-wal`` and ``-shm`` files beside it; the database file itself is never written.)
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.analysis.summary import Experiment, load_experiment
from lmlab.errors import UserError
from lmlab.names import RESULT_PLAN, RESULT_SPEC, RUNS_DIR, STORE_FILE, TERMINAL, Status
from lmlab.serve.payload import experiment_payload
from lmlab.store import MetricRow, Store
from lmlab.store.db import MIGRATIONS

# How deep below the served directory experiments are looked for: DIR/exp, DIR/project/exp, ...
MAX_DEPTH = 4
# A cached experiment is reloaded after this long even if its store looks unchanged: a
# safety net for file systems with coarse timestamps, never the normal path.
MAX_AGE_S = 30.0
LATEST_SCHEMA = max(m.version for m in MIGRATIONS)
# SQLite's own files beside an experiment's store.
_STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal")

Fingerprint = tuple[Any, ...]


class _ReusingStore(Store):
    """A read-only store that hands back an ended run's curves as the last load read them, as
    long as the run has not changed since (same status, update time and last event): of a sweep
    only the running runs are read again, not every row of every run at every poll.

    A run that is started again (a retry, a resume) first drops rows and then records its
    provenance; a poll that falls in between still gets the old curves, and the next one the
    new (its update time has changed).

    A store of a newer schema is refused, as a normal open refuses it; an older one is read as
    it is (a read-only store is not migrated; the readers accept either shape of a record)."""

    def __init__(self, path: Path, cache: dict[str, tuple[Any, dict[str, list[MetricRow]]]]):
        super().__init__(path, read_only=True)
        self.cache = cache
        try:
            version = self.schema_version
        except BaseException:
            self.close()
            raise
        if version > LATEST_SCHEMA:
            self.close()
            raise UserError(f"this experiment database has schema version {version}, but this "
                            f"lmlab only knows up to {LATEST_SCHEMA}; upgrade lmlab to read it",
                            file=str(path))

    def metrics(self, run_id: str,
                names: Sequence[str] | None = None) -> dict[str, list[MetricRow]]:
        if names is not None:
            return super().metrics(run_id, names)
        row = self.run(run_id)
        key = None
        if row is not None and row["status"] in TERMINAL:
            events = self.events(run_id)
            key = (row["status"], row["updated_at"], events[-1]["id"] if events else None)
        hit = self.cache.get(run_id)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        curves = super().metrics(run_id)
        if key is not None:
            self.cache[run_id] = (key, curves)
        return curves


def read_only_store(directory: Path, cache: dict[str, Any] | None = None) -> Store:
    """The experiment's store, opened read-only (see :class:`_ReusingStore`)."""
    return _ReusingStore(directory / STORE_FILE, {} if cache is None else cache)


def discover(root: Path) -> dict[str, Path]:
    """Every experiment directory under ``root`` (``root`` itself included) by key: its path
    relative to ``root`` in POSIX form, ``"."`` for ``root``. The folders an experiment keeps
    for its runs (checkpoints, logs) and hidden folders are not searched."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel = here.relative_to(root)
        is_experiment = STORE_FILE in filenames
        if is_experiment:
            found[rel.as_posix()] = here
        if len(rel.parts) >= MAX_DEPTH:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (is_experiment and d == RUNS_DIR))
    return found


def fingerprint(directory: Path) -> Fingerprint:
    """Changes whenever the experiment's store has committed something new (and not when a
    reader creates the empty WAL that SQLite's WAL mode needs: see :func:`last_write`)."""
    stats = []
    for name in _STORE_FILES:
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            st = None
        stats.append((st.st_mtime_ns, st.st_size) if st and st.st_size > 0 else None)
    try:
        with read_only_store(directory) as store:
            # Status changes, exactly: the moments that matter most, and a run's last commits
            # can follow each other within one tick of the file system's clock.
            marks = tuple((r["run_id"], r["status"], r["updated_at"]) for r in store.runs())
    except (sqlite3.Error, UserError):
        marks = None  # not initialised yet (a sweep is creating it), or unreadable: next poll
    return (*stats, marks)


def last_write(directory: Path) -> float | None:
    """Seconds since the epoch of the store's last commit on disk. An empty WAL does not count:
    a read-only connection creates one (SQLite's WAL mode needs it), writing nothing."""
    times = []
    for name in _STORE_FILES:
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            continue
        if st.st_size > 0:
            times.append(st.st_mtime)
    return max(times) if times else None


@dataclass(frozen=True)
class Listing:
    """One line of the experiment list: read from the runs table and the stored spec only, so
    listing a directory of large experiments stays cheap."""

    key: str
    name: str
    category: str | None
    objective: str | None
    axis: str | None
    statuses: dict[str, int]
    n_runs: int
    updated: float | None
    error: str | None = None


def listing(key: str, directory: Path) -> Listing:
    """One experiment's list entry; an unreadable store is listed with its error, never fatal."""
    try:
        with read_only_store(directory) as store:
            runs = store.runs()
            spec = (store.get_result(RESULT_SPEC) or {}).get("spec") or {}
            plan = store.get_result(RESULT_PLAN) or {}
    except (sqlite3.Error, UserError) as e:
        return Listing(key, directory.name, None, None, None, {}, 0, last_write(directory),
                       error=str(e))
    meta = spec.get("meta") or {}
    statuses = Counter(r["status"] for r in runs)
    return Listing(
        key=key, name=meta.get("name") or directory.resolve().name,
        category=meta.get("category"), objective=spec.get("objective"),
        axis=plan.get("axis") or spec.get("comparison_axis"),
        statuses={s: statuses[s] for s in Status if statuses[s]}, n_runs=len(runs),
        updated=last_write(directory))


def make_etag(*parts: Any) -> str:
    """An HTTP entity tag for an answer that is a function of ``parts``."""
    return '"' + hashlib.sha256(repr(parts).encode()).hexdigest()[:24] + '"'


@dataclass
class _Loaded:
    fingerprint: Fingerprint
    loaded_at: float
    experiment: Experiment
    payloads: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)


class Catalog:
    """The served directory: its experiments, each loaded read-only and cached until its store
    changes. Shared by the server's worker threads: one load at a time per experiment (a second
    poll waits for the first's answer instead of reading the store again)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._lock = threading.Lock()
        self._loads: dict[Path, threading.Lock] = {}
        self._cache: dict[Path, _Loaded] = {}
        self._curves: dict[Path, dict[str, Any]] = {}

    def experiments(self) -> list[Listing]:
        """Every experiment under the root, the most recently written first."""
        entries = [listing(key, d) for key, d in discover(self.root).items()]
        return sorted(entries, key=lambda e: (-(e.updated or 0.0), e.key))

    def directory(self, key: str) -> Path | None:
        """The directory of experiment ``key``; None unless it is one found under the root (a
        key is never joined onto a path, so no key can reach outside it)."""
        return discover(self.root).get(key)

    def load(self, directory: Path) -> _Loaded:
        """The experiment in ``directory`` as its store holds it now."""
        with self._lock:
            lock = self._loads.setdefault(directory, threading.Lock())
        with lock:
            fp = fingerprint(directory)
            hit = self._cache.get(directory)
            if hit and hit.fingerprint == fp and time.monotonic() - hit.loaded_at < MAX_AGE_S:
                return hit
            curves = self._curves.setdefault(directory, {})
            with read_only_store(directory, curves) as store:
                loaded = _Loaded(fp, time.monotonic(), load_experiment(directory, store))
            self._cache[directory] = loaded
            return loaded

    def payload(self, directory: Path, x_key: str | None, points: int) -> tuple[str, dict]:
        """The experiment page's data (:func:`~.payload.experiment_payload`) and its ETag,
        built once per change of the store."""
        loaded = self.load(directory)
        exp = loaded.experiment
        key = (x_key or exp.x_key, points)
        etag = make_etag(loaded.fingerprint, key)
        with self._lock:
            body = loaded.payloads.get(key)
        if body is None:
            body = experiment_payload(exp, x_key, points)
            with self._lock:
                loaded.payloads[key] = body
        return etag, body
