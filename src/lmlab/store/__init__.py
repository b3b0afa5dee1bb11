"""The experiment store (SQLite, one file per experiment directory) and run provenance.

The migration list lives in :mod:`lmlab.store.db` (``db.MIGRATIONS``); it is not re-exported
here because rebinding a re-exported name would not change the list the store reads.
"""

from lmlab.store.db import MetricRow, Migration, Store
from lmlab.store.notes import add_note, notes, put_samples, samples
from lmlab.store.provenance import capture, hardware_summary

__all__ = [
    "MetricRow",
    "Migration",
    "Store",
    "add_note",
    "capture",
    "hardware_summary",
    "notes",
    "put_samples",
    "samples",
]
