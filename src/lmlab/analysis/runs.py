"""Per-run status rows: what ``lmlab status`` prints and what its ``--json`` promises.

The JSON is a stable interface (documented in the README): a list with one object per run, with
keys ``run_id``, ``arm``, ``seed``, ``status``, ``steps``, ``tokens``, ``wall_s``,
``final_val_loss``, ``final_val_ppl``, ``final_val_bpb``, ``final_val_word_ppl``,
``tokens_per_s``, ``peak_mem_bytes``, ``optimizer_state_bytes`` and ``events``.

For a finished run, ``steps``, ``tokens``, ``wall_s`` and the metrics come from its stored summary
(``wall_s``: total wall-clock seconds of the run). A run without a summary yet (running,
interrupted) reports its last logged train-loss row and last logged metrics instead, so its
``wall_s`` is the training seconds so far (evaluation and setup time not included).
"""

from __future__ import annotations

from typing import Any

from lmlab.store import Store


def run_status(store: Store) -> list[dict[str, Any]]:
    out = []
    for run in store.runs():
        summary = run.get("summary") or {}
        rid = run["run_id"]
        row: dict[str, Any] = {
            "run_id": rid,
            "arm": run["arm"],
            "seed": run["seed"],
            "status": run["status"],
        }
        progress = ("steps", "tokens", "wall_s")
        if all(k in summary for k in progress):
            row.update({k: summary[k] for k in progress})
        else:
            last = store.metrics(rid, ["train_loss"]).get("train_loss", [])
            logged = (last[-1][0], last[-1][1], last[-1][2]) if last else (0, 0, 0.0)
            for k, v in zip(progress, logged, strict=True):
                row[k] = summary.get(k, v)
        for name in ("val_loss", "val_ppl", "val_bpb", "val_word_ppl"):
            row[f"final_{name}"] = _metric(store, rid, summary, f"final_{name}", name)
        for name in ("tokens_per_s", "peak_mem_bytes"):
            row[name] = _metric(store, rid, summary, name, name)
        # Moments / momentum buffers held by the optimizer: what memory experiments compare.
        row["optimizer_state_bytes"] = summary.get("optimizer_state_bytes")
        row["events"] = store.event_counts(rid)
        out.append(row)
    return out


def _metric(store: Store, rid: str, summary: dict[str, Any], key: str, name: str) -> Any:
    """The summary's ``key``; only when the summary lacks it, the last logged ``name``."""
    return summary[key] if key in summary else store.last_metric(rid, name)
