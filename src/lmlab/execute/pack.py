"""Which planned runs train together as one packed run, and the process that trains a pack.

``lmlab run --pack auto|N|off`` (or the spec's ``execution.pack``): the runs of an experiment
that share a shape (``identity(cfg, "shape")``: the seeds of an arm, and arms that differ only in
values that change no tensor shape) and that ``lmlab.train.pack.unpackable`` allows are grouped
into packs of at most N runs, in plan order; each pack trains in one worker process
(``python -m lmlab.execute.worker OUT_DIR RUN_ID RUN_ID ...``), the other runs one to a process
as before. Packing never changes what a run is: its run id, config, record and checkpoint are those
of the solo run, and a pack interrupted once may be resumed packed or not.

``auto`` packs up to :data:`AUTO_MAX` runs, fewer when ``budget.max_memory_mb`` would not hold
them (an estimate from the model's shape, :func:`member_bytes`; the budget itself is checked on
the pack as it trains), and not at all in an experiment that measures speed or memory (the Memory
/ Systems addendum): a packed run's step time and peak memory are its pack's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.identity import digest
from lmlab.model import build_model, mlp_width
from lmlab.spec.expand import Plan, PlannedRun, addendum_requested
from lmlab.train.pack import unpackable

PackOption = Literal["auto", "off"] | int
# The most members `auto` puts in one pack: beyond 8 the gain had flattened on every shape tried.
AUTO_MAX = 8
# On a CPU a pack pays only while a member's step is small enough to be bound by per-operation
# overhead rather than arithmetic. benchmarks/packed.py, 4 members, 2 quiet cores (step_flops
# per member step): 1.27x at 0.13 GFLOP (tiny: a solo run at 25% of the fp32 1024^3-matmul
# rate), 1.09x at 1.5 (49%), 1.00-1.03x at 5.9 (the quickstart: 66%, as high as its small
# matmuls go), 0.99x at 12, 0.96x at 22, 0.98x at 68, 0.93x at 142. `auto` packs CPU runs up to
# this; on a GPU, where a small model is launch-bound, whatever their size.
CPU_PACK_MAX_STEP_FLOPS = 3e9


def parse_pack(value: str | int | None, field: str = "--pack") -> PackOption:
    """``auto``, ``off`` or a number of runs per pack (1 is ``off``)."""
    if value is None:
        return "off"
    if isinstance(value, int) or str(value).isdigit():
        n = int(value)
        if n < 1:
            raise UserError(f"a pack holds at least 1 run, got {n}", field=field)
        return "off" if n == 1 else n
    if value in ("auto", "off"):
        return value  # type: ignore[return-value]
    raise UserError(f"pack is auto, off or a number of runs per pack, not {value!r}", field=field)


@dataclass(frozen=True)
class Pack:
    """Runs that train as one; a pack of one is a solo run."""

    runs: tuple[PlannedRun, ...]

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    @property
    def packed(self) -> bool:
        return len(self.runs) > 1


def member_bytes(cfg: RunConfig, vocab_size: int) -> int:
    """An estimate of the memory one more member adds to a pack, in bytes (fp32): its weights,
    gradients and up to two optimizer moments (16 bytes a parameter, counted on a meta-device
    model), and the activations its micro-batch keeps for backward: per layer and token about
    16 d_model values (norms, q/k/v, attention output, residuals) and 2 MLP widths, plus each
    head's T attention probabilities where attention is materialised (manual attention, or
    dropout in a pack)."""
    m, tc = cfg.model, cfg.train
    with torch.device("meta"):
        params = build_model(m, vocab_size, tc.seq_len).num_params()
    materialised = m.attention == "manual" or m.dropout > 0
    per_token = m.n_layer * (16 * m.d_model + 2 * mlp_width(m)
                             + (m.n_head * tc.seq_len if materialised else 0)) + 4 * m.d_model
    return 16 * params + 4 * tc.micro_batch_size * tc.seq_len * per_token


def step_flops(cfg: RunConfig, vocab_size: int) -> float:
    """Training FLOPs of one optimizer step of ``cfg``'s model: forward and backward of the
    weights' matmuls (the head's included) and attention's (``GPT.flops_per_token``), over the
    step's tokens. Counted on a meta-device model."""
    tc = cfg.train
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, tc.seq_len)
    return model.flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len


def _device_type(cfg: RunConfig) -> str:
    return "cuda" if cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"


def _baseline_bytes(device_type: str) -> int:
    """What a worker holds before any member: on CPU about what this process holds now (the
    interpreter, torch, the data); on a GPU the allocator starts near zero."""
    return psutil.Process().memory_info().rss if device_type == "cpu" else 0


def plan_packs(plan: Plan, option: PackOption, runs: list[PlannedRun] | None = None,
               vocab_size: int | None = None) -> list[Pack]:
    """The units ``runs`` (default: the plan's) train in: packs of one shape, in plan order, and
    singletons. ``vocab_size`` (the tokenizer's) sizes the memory estimate; without it ``auto``
    uses the config's BPE size."""
    runs = list(plan.runs if runs is None else runs)
    if option == "off" or (option == "auto" and not packing_pays(plan)):
        return [Pack((r,)) for r in runs]
    groups: dict[str, list[PlannedRun]] = {}
    units: list[list[PlannedRun]] = []
    for r in runs:
        if unpackable(r.config) is not None:
            units.append([r])
            continue
        key = digest(r.config, "shape")
        if key not in groups:
            groups[key] = []
            units.append(groups[key])
        groups[key].append(r)
    out: list[Pack] = []
    for unit in units:
        size = option if isinstance(option, int) else auto_size(unit[0].config, vocab_size)
        out += [Pack(tuple(unit[i:i + size])) for i in range(0, len(unit), size)]
    return out


def packing_pays(plan: Plan) -> bool:
    """Whether ``auto`` packs this experiment: not when its question is speed or memory."""
    return not addendum_requested(plan.spec)


def auto_size(cfg: RunConfig, vocab_size: int | None = None) -> int:
    """How many runs ``auto`` puts in a pack of ``cfg``'s shape: 1 (none) on a CPU past
    :data:`CPU_PACK_MAX_STEP_FLOPS`; else :data:`AUTO_MAX`, or fewer when
    ``budget.max_memory_mb`` would not hold them."""
    vocab = vocab_size or cfg.tokenizer.vocab_size
    if _past_cpu_crossover(cfg, vocab) is not None:
        return 1
    limit = cfg.budget.max_memory_mb
    if limit is None:
        return AUTO_MAX
    room = limit * 2**20 - _baseline_bytes(_device_type(cfg))
    return max(1, min(AUTO_MAX, int(room // member_bytes(cfg, vocab))))


def _past_cpu_crossover(cfg: RunConfig, vocab_size: int) -> float | None:
    """A CPU run's step FLOPs when they are past :data:`CPU_PACK_MAX_STEP_FLOPS` (packing it
    would not pay), else None."""
    if _device_type(cfg) != "cpu":
        return None
    flops = step_flops(cfg, vocab_size)
    return flops if flops > CPU_PACK_MAX_STEP_FLOPS else None


def auto_note(plan: Plan, option: PackOption, vocab_size: int | None = None) -> str | None:
    """Why ``auto`` leaves runs that could share a pack unpacked, for `lmlab plan`; None when it
    does not."""
    if option != "auto":
        return None
    if not packing_pays(plan):
        return ("not packed: the experiment measures speed or memory (the Memory / Systems "
                "addendum), and a packed run's step time and peak memory are its pack's")
    past = (_past_cpu_crossover(r.config, vocab_size or r.config.tokenizer.vocab_size)
            for r in plan.runs if unpackable(r.config) is None)
    flops = next((f for f in past if f is not None), None)
    if flops is None:
        return None
    return (f"not packed: on a CPU, a step of {flops / 1e9:.0f} GFLOP per run is past where "
            f"packing pays ({CPU_PACK_MAX_STEP_FLOPS / 1e9:.0f} GFLOP, benchmarks/packed.py); "
            "--pack N packs anyway")


def describe(packs: list[Pack]) -> dict[str, str]:
    """{run_id: the name of its pack} for the packed runs (``p1``, ``p2``, ... in plan order)."""
    names: dict[str, str] = {}
    for i, pack in enumerate((p for p in packs if p.packed), start=1):
        for rid in pack.run_ids:
            names[rid] = f"p{i}"
    return names


def annotate(record: dict[str, Any], packs: list[Pack],
             estimates: dict[str, float] | None = None, note: str | None = None,
             ) -> dict[str, Any]:
    """A plan record (``Plan.to_json()``) with each run's pack (its name, or None) and the packs
    listed, with their expected wall-clock when ``estimates`` has the runs', and ``note``
    (:func:`auto_note`) when packing was asked for and not done."""
    if note is not None:
        record["pack_note"] = note
    names = describe(packs)
    for r in record["runs"]:
        r["pack"] = names.get(r["run_id"])
    record["packs"] = [{"name": names[p.run_ids[0]], "runs": p.run_ids,
                        "estimate_s": None if estimates is None
                        else sum(estimates[i] for i in p.run_ids)}
                       for p in packs if p.packed]
    return record


def command(pack: Pack, out_dir: Path, base: Path | None, *,
            driver_token: str | None = None) -> list[str]:
    """The worker process of a unit, a solo run or a pack (``lmlab.execute.worker`` trains
    either). It dies with this process (``--driver-pid``) and, given ``driver_token``, stops
    when the directory lock stops naming this driver."""
    return worker_command(pack.run_ids, pack.runs[0].config.train.distributed.nproc, out_dir,
                          base, driver_token=driver_token)


def worker_command(run_ids: list[str], nproc: int, out_dir: Path, base: Path | None, *,
                   driver_token: str | None = None) -> list[str]:
    """:func:`command` for run ids; ``nproc`` > 1: torchrun starts the worker as that many ranks
    of one run over several devices (their parent is torchrun's agent: the driver's lock, not
    its pid, tells them when it is gone)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "lmlab.execute.worker", str(out_dir), *run_ids]
    else:
        cmd = [sys.executable, "-m", "lmlab.execute.worker", str(out_dir), *run_ids,
               "--driver-pid", str(os.getpid())]
    if driver_token is not None:
        cmd += ["--driver-token", driver_token]
    return cmd + (["--base", str(base)] if base is not None else [])
