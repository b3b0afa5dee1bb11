"""Everything one run writes, and the checks made on what it writes.

The :class:`Recorder` is the only part of training that writes records, and it writes them through
a sink (:mod:`lmlab.store.ingest`): into the store on this host, or as batches to an outbox the
driver ingests (a Ray or Slurm worker), committed once per interval, event, evaluation and
lifecycle change, and before every checkpoint. It buffers the
per-step rows of a log interval (the loss and gradient-norm tensors stay on the device until the
interval ends, then are read in one go), writes them in one transaction with the interval's
speed and memory, runs the stability detectors (loss spikes, divergence) and the memory budget
on them, records events and evaluations, and writes the run's status, provenance and summary.
Its ``state_dict()`` travels in the checkpoint, so rows buffered at a checkpoint are written
after a resume, and a resumed run's detectors, peak memory and wall-clock continue.

With the device-side finiteness check (``train.nonfinite_check``) each buffered step also holds
its device flag; :meth:`Recorder.settle` reads them, with the losses, before anything is written
(a log interval, a probe, an evaluation, a checkpoint), and a non-finite step found there is
recorded exactly as the host check records it: at its own step, the steps computed after it
(whose updates were skipped too) dropped.

A packed run's members each have their own Recorder; ``pack`` names the pack, and its memory
figures and budget checks are the pack's (one process), which its events and summary say.

When a run stops early its rows stay in the store and its status says why (``StopReason``):
a ``nan`` event is recorded before the optimizer step would have applied a non-finite update; a
``divergence`` event when an interval's loss is above ``divergence_factor`` times the first
interval's; ``over_budget`` / ``oom`` events with the memory figure. None of these raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.config import RunConfig, TrainConfig
from lmlab.names import (
    GRAD_NORM,
    LR,
    MFU,
    PEAK_MEM,
    PEAK_MEM_RESERVED,
    STEP_TIME,
    TOKENS_PER_S,
    TRAIN_LOSS,
    Event,
    Status,
    eval_metric,
)
from lmlab.store import Store
from lmlab.store.ingest import Outbox, RunSink, sink_for
from lmlab.train.diagnostics import SpikeDetector
from lmlab.train.memory import read_peak
from lmlab.train.mfu import peak_flops
from lmlab.train.state import Point, RunState, StopReason


@dataclass
class StepRow:
    """One optimizer step as logged; ``loss`` and ``grad_norm`` are device tensors until the
    interval is flushed (or a checkpoint is written)."""

    at: Point
    loss: torch.Tensor | float
    grad_norm: torch.Tensor | float
    lr: float
    bad: torch.Tensor | float = 0.0  # the device-side check's flag until settled (1.0: non-finite)


@dataclass(frozen=True)
class Interval:
    """What a progress display needs after a log interval."""

    at: Point
    mean_loss: float
    tokens_per_s: float


class Recorder:
    def __init__(self, records: Store | Outbox | RunSink, run_id: str, cfg: RunConfig,
                 device: torch.device, flops_per_token: float | None = None) -> None:
        self.sink = sink_for(records, run_id)
        self.run_id = run_id
        self.device = device
        self.train = cfg.train
        self.diag = cfg.evaluation.diagnostics
        # MFU: model FLOPs per token over the device's peak (lmlab.train.mfu), when both known.
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops(device, cfg.train.precision, cfg.train.tf32)
        self.pack: list[str] | None = None  # the run ids of its pack, when packed
        # A pack's members share one wait for the device (see settle): {step: seconds}.
        self.pack_wait: dict[int, float] | None = None
        self.max_mem = cfg.budget.max_memory_mb * 2**20 if cfg.budget.max_memory_mb else None
        self.pending: list[StepRow] = []
        self.spikes = SpikeDetector.from_config(self.diag)
        self.early_loss: float | None = None  # mean loss of the first interval (divergence)
        self.interval_start = Point(0, 0, 0.0)
        # Segments of the run before the last resume count too: the run's peak memory and
        # wall-clock are over all of it.
        self.earlier_wall_s = 0.0
        self.earlier_peak = 0
        self.segment_start = time.perf_counter()

    # -- the run's record ----------------------------------------------------------------------

    def start(self, state: RunState, resumed: bool, provenance: dict[str, Any]) -> None:
        """Rows written after the checkpoint (a killed run) are dropped: the resumed run
        writes them again, so every step ends up stored exactly once."""
        self.sink.truncate_after(state.step if resumed else -1)
        if resumed:
            self.event(state.at, Event.RESUME, {"from_step": state.step})
        else:
            self.interval_start = state.at
        self.sink.set_provenance(provenance)
        self.sink.set_status(Status.RUNNING)
        self.sink.commit()  # batch 0 of this segment: the truncation goes first

    def finish(self, stop: StopReason, summary: dict[str, Any]) -> None:
        if stop is StopReason.INTERRUPTED:
            self.sink.set_status(Status.INTERRUPTED)
        else:
            self.sink.set_status(stop.status, summary=summary)
        self.sink.commit()

    def summary(self, state: RunState, stop: StopReason) -> dict[str, Any]:
        """The run's own facts at its end (final metrics are defined from the rows, in
        :mod:`lmlab.analysis.records`)."""
        peak = read_peak(self.device)
        out = {
            "steps": state.step, "tokens": state.tokens, "train_s": state.seconds,
            "wall_s": self.wall_s(), "stop": str(stop), "reason": stop.reason,
            "peak_mem_bytes": max(peak.peak_bytes, self.earlier_peak),
            "peak_mem_kind": peak.kind, "peak_mem_reserved_bytes": peak.reserved_bytes,
            "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
        }
        if self.pack is not None:
            # Its memory is the pack's, and its training seconds are the pack's steps: each
            # member was trained during all of them.
            out["packed_with"] = [r for r in self.pack if r != self.run_id]
            out["peak_mem_of"] = "pack"
        return out

    def wall_s(self) -> float:
        return self.earlier_wall_s + time.perf_counter() - self.segment_start

    def peak_bytes(self) -> int:
        return max(self.earlier_peak, read_peak(self.device).peak_bytes)

    # -- rows and events -------------------------------------------------------------------------

    def event(self, at: Point, kind: Event, detail: dict[str, Any] | None = None) -> None:
        self.sink.log_event(*at, kind, detail)
        self.sink.commit()  # events are rare and each may be the last thing a run says

    def metrics(self, at: Point, values: dict[str, float]) -> None:
        if values:
            self.sink.log_metrics(*at, values)

    def evaluation(self, at: Point, split: str, result: dict[str, float]) -> None:
        """An evaluation's numbers, as ``{split}_{key}`` rows."""
        self.metrics(at, {eval_metric(split, k): v for k, v in result.items() if k != "tokens"})
        self.sink.commit()

    def compile_fallback(self, state: RunState, reason: str) -> None:
        self.event(state.at, Event.COMPILE_FALLBACK, {"reason": reason})

    def step(self, at: Point, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
             bad: torch.Tensor | None = None) -> None:
        self.pending.append(StepRow(at, loss, grad_norm, lr, 0.0 if bad is None else bad))

    def settle(self, state: RunState, probe: dict[str, float] | None = None) -> StopReason | None:
        """Read the device-side flags of the buffered steps (a no-op when the host checked them).
        A non-finite step among them is recorded as :meth:`non_finite` records it, the steps
        computed after it are dropped and ``state`` goes back to before it. ``probe``: what the
        last step's diagnostics saw, recorded with it if it is the bad one."""
        live = [r for r in self.pending if isinstance(r.bad, torch.Tensor)]
        if not live:
            return None
        t0 = time.perf_counter()
        flags = torch.stack([r.bad for r in live]).tolist()  # waits for the device
        for r, flag in zip(live, flags, strict=True):
            r.bad = flag
        # Training time the host did not see (it ran ahead of the device): the interval's step
        # time and tokens/sec stay exact, rows inside an interval carry the host's clock.
        waited = time.perf_counter() - t0
        last = self.pending[-1]
        if self.pack_wait is not None:  # the first member to read waited for the whole pack
            if last.at.step not in self.pack_wait:
                self.pack_wait.clear()
                self.pack_wait[last.at.step] = waited
            waited = self.pack_wait[last.at.step]
        last.at = last.at._replace(seconds=last.at.seconds + waited)
        state.seconds += waited
        i = next((i for i, r in enumerate(self.pending) if r.bad), None)
        if i is None:
            return None
        row = self.pending[i]
        before = self.pending[i - 1].at if i > 0 else self.interval_start
        state.rewind(before, _samples_after(self.train, before.step), row.at.seconds)
        probe = probe if probe is not None and row is last else {}
        del self.pending[i:]
        return self.non_finite(row.at, torch.as_tensor(row.loss), torch.as_tensor(row.grad_norm),
                               row.lr, probe)

    def flush(self) -> Interval | None:
        """Write the buffered steps and the interval's speed and memory in one transaction, and
        run the spike detector on them."""
        if not self.pending:
            return None
        assert not any(isinstance(r.bad, torch.Tensor) for r in self.pending), "settle() first"
        self._to_host()
        rows = []
        for r in self.pending:
            rows.append((*r.at, {TRAIN_LOSS: r.loss, GRAD_NORM: r.grad_norm, LR: r.lr}))
            spike = self.spikes.update(r.at.step, float(r.loss))
            if spike:
                self.event(r.at, Event.SPIKE, spike)
        last = self.pending[-1].at
        peak = read_peak(self.device)
        extra: dict[str, float] = {PEAK_MEM: float(max(peak.peak_bytes, self.earlier_peak))}
        if peak.reserved_bytes is not None:
            extra[PEAK_MEM_RESERVED] = float(peak.reserved_bytes)
        steps, seconds = last.step - self.interval_start.step, last.seconds - self.interval_start.seconds
        tokens_per_s = 0.0
        if steps > 0 and seconds > 0:
            tokens_per_s = (last.tokens - self.interval_start.tokens) / seconds
            extra.update({STEP_TIME: seconds / steps, TOKENS_PER_S: tokens_per_s})
            if self.flops_per_token and self.peak_flops:
                extra[MFU] = tokens_per_s * self.flops_per_token / self.peak_flops
        rows[-1][3].update(extra)
        self.sink.log_many(rows)
        self.sink.commit()
        mean_loss = sum(float(r.loss) for r in self.pending) / len(self.pending)
        self.pending.clear()
        self.interval_start = last
        return Interval(last, mean_loss, tokens_per_s)

    # -- the checks ------------------------------------------------------------------------------

    def check(self, interval: Interval | None) -> StopReason | None:
        """The checks made on every flushed interval: divergence, then the memory budget."""
        if interval is None:
            return None
        return self.diverged(interval) or self.over_memory(interval.at)

    def diverged(self, interval: Interval) -> StopReason | None:
        """The first interval's mean loss is the reference; a later one above
        ``divergence_factor`` times it (or NaN) ends the run."""
        if self.early_loss is None:
            self.early_loss = interval.mean_loss
            return None
        if interval.mean_loss <= self.diag.divergence_factor * self.early_loss:
            return None
        self.event(interval.at, Event.DIVERGENCE, {"loss": interval.mean_loss,
                                                   "early_loss": self.early_loss,
                                                   "factor": self.diag.divergence_factor})
        return StopReason.DIVERGED

    def over_memory(self, at: Point) -> StopReason | None:
        """The run's peak memory against ``budget.max_memory_mb``."""
        peak = read_peak(self.device)
        if self.max_mem is None or peak.peak_bytes <= self.max_mem:
            return None
        self.event(at, Event.OVER_BUDGET, {"peak_mem_bytes": peak.peak_bytes,
                                           "peak_mem_kind": peak.kind,
                                           "max_memory_mb": self.max_mem / 2**20,
                                           **self._memory_scope()})
        return StopReason.OVER_MEMORY

    def _memory_scope(self) -> dict[str, Any]:
        """A packed run's memory is its pack's: its memory events say so."""
        return {} if self.pack is None else {"peak_mem_of": "pack", "pack": self.pack}

    def non_finite(self, at: Point, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                   probe: dict[str, float]) -> StopReason:
        """Record the bad step first, then stop: no optimizer step applied it."""
        bad_loss, bad_norm = loss.item(), grad_norm.item()
        self.event(at, Event.NAN, {"loss": bad_loss, "grad_norm": bad_norm,
                                   "note": "stopped before the optimizer step"})
        self.pending.append(StepRow(at, bad_loss, bad_norm, lr))
        self.metrics(at, probe)  # where the non-finite gradient sits, block by block
        return StopReason.NON_FINITE

    def out_of_memory(self, at: Point, error: BaseException) -> StopReason:
        peak = read_peak(self.device)
        self.event(at, Event.OOM, {"error": f"{type(error).__name__}: {error}"[:2000],
                                   "peak_mem_bytes": peak.peak_bytes, "peak_mem_kind": peak.kind,
                                   "max_memory_mb": None if self.max_mem is None
                                   else self.max_mem / 2**20, **self._memory_scope()})
        return StopReason.OOM

    # -- checkpoints -----------------------------------------------------------------------------

    def _to_host(self) -> None:
        """The buffered loss / grad-norm tensors as floats, in one device read."""
        live = [r for r in self.pending if isinstance(r.loss, torch.Tensor)]
        if not live:
            return
        values = torch.stack([torch.stack([torch.as_tensor(r.loss).float(),
                                           torch.as_tensor(r.grad_norm).float()])
                              for r in live]).tolist()
        for r, (loss, gnorm) in zip(live, values, strict=True):
            r.loss, r.grad_norm = loss, gnorm

    def state_dict(self) -> dict[str, Any]:
        assert not any(isinstance(r.bad, torch.Tensor) for r in self.pending), "settle() first"
        self._to_host()
        self.sink.commit()  # what was written before the checkpoint is delivered before it
        return {
            "pending": [[*r.at, r.loss, r.grad_norm, r.lr] for r in self.pending],
            "spikes": self.spikes.state_dict(), "early_loss": self.early_loss,
            "interval_start": list(self.interval_start), "wall_s": self.wall_s(),
            "peak_mem_bytes": self.peak_bytes(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [StepRow(Point(int(s), int(t), float(w)), float(loss), float(g), float(lr))
                        for s, t, w, loss, g, lr in state["pending"]]
        self.spikes.load_state_dict(state["spikes"])
        self.early_loss = state["early_loss"]
        start = state.get("interval_start")
        self.interval_start = Point(*start) if start else Point(0, 0, 0.0)
        self.earlier_wall_s = float(state.get("wall_s", 0.0))
        self.earlier_peak = int(state.get("peak_mem_bytes", 0))
        self.segment_start = time.perf_counter()


def _samples_after(train: TrainConfig, steps: int) -> int:
    """Training sequences consumed by ``steps`` optimizer steps, following the batch ramp."""
    ramp = min(steps, train.batch_ramp_steps)
    return sum(train.batch_size_at(s) for s in range(ramp)) + (steps - ramp) * train.batch_size
