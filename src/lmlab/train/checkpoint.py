"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint holds the run's config (as JSON text), the learner (model, optimizer, grad scaler,
EMA weights), the :class:`~lmlab.train.state.RunState` (counters, evaluation cadence, RNG) and
the :class:`~lmlab.train.recorder.Recorder`'s state (rows not yet written, detector states,
peak memory and wall-clock so far). Every part is tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint is data, and loading one never runs code. A file
that would need code to load (a pickle someone crafted) is refused and left where it is.

A new checkpoint is written to a temporary file and synced; only then does the current one become
``checkpoint.prev.pt`` and the new one ``checkpoint.pt``. So a kill at any moment leaves a
complete checkpoint, and a checkpoint that turns out damaged later (truncated, bytes changed: the
zip's CRCs are checked before anything is unpickled) has an earlier one behind it. A damaged file
is moved aside, never deleted, and the run resumes from the one before, or from the start.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.identity import same, v1_config_hash
from lmlab.names import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE
from lmlab.train.distributed import writes_checkpoints

FORMAT = 2
PARTS = ("config", "learner", "state", "recorder")


class CheckpointDamaged(Exception):
    """A checkpoint file that cannot be read back whole."""


@dataclass(frozen=True)
class SetAside:
    """A damaged checkpoint, where it was moved to, and why it could not be read."""

    file: str
    moved_to: str
    error: str

    def detail(self) -> dict[str, str]:
        return asdict(self)


def save_checkpoint(run_dir: Path, cfg: RunConfig, parts: dict[str, Any]) -> Path:
    path = run_dir / CHECKPOINT_FILE
    if not writes_checkpoints():  # a data-parallel rank but 0: every rank holds the same state
        return path
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "config": cfg.to_json(), **parts}, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():  # the last good one stays, as the previous, until the new one is in place
        os.replace(path, run_dir / PREVIOUS_CHECKPOINT_FILE)
    os.replace(tmp, path)
    _sync_dir(run_dir)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file in today's layout. Raises :class:`CheckpointDamaged` when it cannot be
    read back whole, and a UserError when it would need code to load or is from a newer lmlab."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # every member against its CRC, before unpickling anything
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointDamaged(f"not a readable checkpoint archive ({e})") from None
    if bad is not None:
        raise CheckpointDamaged(f"{bad} does not match its checksum")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code is None:
            raise CheckpointDamaged(f"unreadable pickle ({_first_line(e)})") from None
        raise UserError(
            f"not a checkpoint lmlab wrote: loading it would call {code.group(1)}, so it was not "
            "loaded (checkpoints are only ever loaded as data). It is left where it is: delete it "
            "or move it away, and the run resumes from the checkpoint before it or from the start",
            file=str(path)) from None
    except Exception as e:  # torch reports a damaged archive in many ways
        raise CheckpointDamaged(f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointDamaged(f"holds a {type(ckpt).__name__}, not a checkpoint")
    version = ckpt.get("format")
    if isinstance(version, int) and version > FORMAT:
        raise UserError(f"a checkpoint of format {version}, written by a newer lmlab (this one "
                        f"reads up to {FORMAT}): upgrade lmlab to resume it", file=str(path))
    if version is None:
        try:
            return _from_v1(ckpt)
        except KeyError as e:
            raise CheckpointDamaged(f"lacks {e} (neither today's layout nor lmlab 0.1's)") from None
    missing = [p for p in PARTS if p not in ckpt]
    if version != FORMAT or missing:
        raise CheckpointDamaged(f"format {version!r}, missing {missing}")
    return ckpt


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint in ``run_dir`` that reads back whole, or None (nothing is moved)."""
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        if (run_dir / name).exists():
            try:
                return read_checkpoint(run_dir / name)
            except CheckpointDamaged:
                continue
    return None


def resume_checkpoint(run_dir: Path) -> tuple[dict[str, Any] | None, list[SetAside]]:
    """What a resuming run starts from: the newest checkpoint that reads back whole (None: start
    afresh), and the damaged ones that were moved aside on the way."""
    damaged: list[SetAside] = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return read_checkpoint(path), damaged
        except CheckpointDamaged as e:
            damaged.append(_set_aside(path, str(e)))
    return None, damaged


def set_aside_checkpoints(run_dir: Path, why: str) -> list[SetAside]:
    """Move a run's checkpoints aside (kept, renamed), so that it restarts from the beginning:
    for a run whose records since some checkpoint cannot be trusted whole."""
    return [_set_aside(run_dir / name, why) for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)
            if (run_dir / name).exists()]


def belongs_to(ckpt: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether ``ckpt`` is a checkpoint of the run ``cfg`` describes."""
    if ckpt.get("config") is not None:
        return same(json.loads(ckpt["config"]), cfg)
    return ckpt.get("config_hash") == v1_config_hash(cfg)


def check_belongs(ckpt: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    if not belongs_to(ckpt, cfg):
        raise UserError(f"{run_dir} holds a checkpoint of a different config; it is kept: use "
                        "another output directory")


def _set_aside(path: Path, error: str) -> SetAside:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.rename(path, target)
    return SetAside(file=path.name, moved_to=target.name, error=error[:500])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _sync_dir(directory: Path) -> None:
    """Make the renames themselves durable (a crash right after must not undo them)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system syncs a directory
        pass
    finally:
        os.close(fd)


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
