"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint holds the run's config (as JSON text), the learner (model, optimizer, grad scaler,
EMA weights), the :class:`~lmlab.train.state.RunState` (counters, evaluation cadence, RNG) and
the :class:`~lmlab.train.recorder.Recorder`'s state (rows not yet written, detector states,
peak memory and wall-clock so far). Every part is tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint is data, and loading one never runs code.

It is written to a temporary file, synced and renamed into place, so a kill during the write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.identity import same, v1_config_hash
from lmlab.names import CHECKPOINT_FILE

FORMAT = 2


def save_checkpoint(run_dir: Path, cfg: RunConfig, parts: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "config": cfg.to_json(), **parts}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` in today's layout, or None when there is none."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt if ckpt.get("format") == FORMAT else _from_v1(ckpt)


def belongs_to(ckpt: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether ``ckpt`` is a checkpoint of the run ``cfg`` describes."""
    if ckpt.get("config") is not None:
        return same(json.loads(ckpt["config"]), cfg)
    return ckpt.get("config_hash") == v1_config_hash(cfg)


def check_belongs(ckpt: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    if not belongs_to(ckpt, cfg):
        raise UserError(f"{run_dir} holds a checkpoint of a different config; it is kept: use "
                        "another output directory")


def _from_v1(ckpt: dict[str, Any]) -> dict[str, Any]:
    """lmlab 0.1 wrote one flat dictionary."""
    return {
        "format": FORMAT, "config": None, "config_hash": ckpt["config_hash"],
        "learner": {k: ckpt[k] for k in ("model", "optimizer", "scaler", "ema")},
        "state": {"step": ckpt["step"], "samples": ckpt["samples"], "tokens": ckpt["tokens"],
                  "seconds": ckpt["train_s"], "next_eval": ckpt["eval_next_at"],
                  "rng": ckpt["rng"]},
        "recorder": {"pending": [list(r) for r in ckpt["pending"]], "spikes": ckpt["spikes"],
                     "early_loss": ckpt["early_loss"], "wall_s": ckpt.get("wall_s", 0.0),
                     "peak_mem_bytes": ckpt.get("peak_mem_bytes", 0),
                     "interval_start": [ckpt["step"], ckpt["tokens"], ckpt["train_s"]]},
    }
