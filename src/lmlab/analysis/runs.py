"""Per-run status rows: what ``lmlab status`` prints and what its ``--json`` promises.

The JSON is a stable interface (documented in the README): a list with one object per run.
"""

from __future__ import annotations

from typing import Any

from lmlab.store import Store

STATUS_FIELDS = (
    "run_id", "arm", "seed", "status", "steps", "tokens", "wall_s", "final_val_loss",
    "final_val_ppl", "final_val_bpb", "final_val_word_ppl", "tokens_per_s", "peak_mem_bytes",
    "optimizer_state_bytes", "events",
)


def run_status(store: Store) -> list[dict[str, Any]]:
    out = []
    for run in store.runs():
        summary = run.get("summary") or {}
        rid = run["run_id"]
        last = store.metrics(rid, ["train_loss"]).get("train_loss", [])
        steps, tokens, wall = (last[-1][0], last[-1][1], last[-1][2]) if last else (0, 0, 0.0)
        row: dict[str, Any] = {
            "run_id": rid,
            "arm": run["arm"],
            "seed": run["seed"],
            "status": run["status"],
            "steps": summary.get("steps", steps),
            "tokens": summary.get("tokens", tokens),
            "wall_s": summary.get("wall_s", wall),
        }
        for name in ("val_loss", "val_ppl", "val_bpb", "val_word_ppl"):
            row[f"final_{name}"] = summary.get(f"final_{name}", store.last_metric(rid, name))
        row["tokens_per_s"] = summary.get("tokens_per_s", store.last_metric(rid, "tokens_per_s"))
        row["peak_mem_bytes"] = summary.get("peak_mem_bytes", store.last_metric(rid, "peak_mem_bytes"))
        # Moments / momentum buffers held by the optimizer: what memory experiments compare.
        row["optimizer_state_bytes"] = summary.get("optimizer_state_bytes")
        row["events"] = store.event_counts(rid)
        out.append(row)
    return out
