"""What a researcher and a run's final model add to an experiment besides metrics: notes
(``lmlab note DIR "text"``) and each run's text samples. Both are result records
(:meth:`Store.put_result`), so they live in the one store, travel with it and are copied by
``lmlab doctor --recover`` like every other result."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from lmlab.names import RESULT_NOTE_PREFIX, RESULT_SAMPLES_PREFIX
from lmlab.store.db import Store


def add_note(store: Store, text: str, *, source: str = "lmlab note") -> str:
    """Store one note with the current UTC time; returns that time (ISO 8601)."""
    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The time orders the keys; the random part keeps two notes of one microsecond apart.
    store.put_result(f"{RESULT_NOTE_PREFIX}{stamp}-{secrets.token_hex(4)}",
                     {"at": stamp, "text": text, "source": source})
    return stamp


def notes(store: Store) -> list[dict[str, Any]]:
    """Every stored note, oldest first: ``{at, text, source}``."""
    found = [store.get_result(k) for k in store.result_keys(RESULT_NOTE_PREFIX)]
    return [n for n in found if isinstance(n, dict) and n.get("text")]


def put_samples(store: Store, run_id: str, record: dict[str, Any]) -> None:
    store.put_result(f"{RESULT_SAMPLES_PREFIX}{run_id}", record)


def samples(store: Store, run_id: str) -> dict[str, Any] | None:
    return store.get_result(f"{RESULT_SAMPLES_PREFIX}{run_id}")
