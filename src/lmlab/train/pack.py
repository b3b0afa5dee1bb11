"""A packed run: several runs of one shape trained together as one stacked model, in one process.

Each member is a run in its own right, with everything a solo run has: its run id, config and
record; its own :class:`~lmlab.train.step.Learner` (weights, optimizer and its state, schedule,
per-member gradient clipping, EMA), data order (its seed's ``TrainBatcher``), dropout generator,
:class:`~lmlab.train.state.RunState`, :class:`~lmlab.train.recorder.Recorder`, diagnostics and
checkpoint (in its own run directory, in the solo format: a member's checkpoint resumes solo or
packed). What the members share is the forward and backward pass: one
:class:`~lmlab.model.stacked.StackedGPT` over their weights and one fused loss call
(:func:`~lmlab.train.step.pack_step`), then each member's own update.

The loop reads like :func:`lmlab.train.loop.train`'s and calls the same
:func:`~lmlab.train.loop.between_steps` and :func:`~lmlab.train.loop.wrap_up` for each member:

- a member that goes non-finite is recorded and stopped (its event before its step, nothing
  applied to it) while the others go on; so is one that diverges, runs out of budget first, or
  completes; the pack is then rebuilt from the members left;
- memory is the process's, so a pack's members share one peak: the budget applies to the pack,
  and the memory events and summaries say ``peak_mem_of: pack``;
- every member is charged the pack's step time (it was trained during all of it), so a member's
  tokens/sec is its own tokens over the pack's training seconds;
- checkpoints are written for all members at once (when any member's cadence is due), so a
  killed pack resumes as the same pack and ends with exactly the rows of an uninterrupted one;
  members whose checkpoints are at different steps resume as separate packs.

Which runs may pack: one ``identity(cfg, "shape")`` and nothing :func:`unpackable` objects to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import RunConfig
from lmlab.data.batches import TrainBatcher, iter_eval_batches
from lmlab.data.tokenize import DataBundle, prepare_data
from lmlab.errors import UserError
from lmlab.identity import digest
from lmlab.model.stacked import StackedGPT
from lmlab.model.wrap import CompileFallback
from lmlab.names import VAL, Event
from lmlab.optim import build_schedule, set_lr
from lmlab.store import Store
from lmlab.store.ingest import Outbox
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.loop import (
    LogLine,
    Run,
    RunResult,
    _checkpoint,
    _evaluate,
    _micro_batches,
    _provenance,
    _resume,
    between_steps,
    flops_per_token,
    wrap_up,
)
from lmlab.train.memory import keep_freed_memory, reset_peak
from lmlab.train.recorder import Recorder
from lmlab.train.state import RunState, StopReason, eval_cadence
from lmlab.train.step import MicroBatch, build_learner, pack_step, resolve_device


def unpackable(cfg: RunConfig) -> str | None:
    """Why a run cannot be a member of a pack, or None."""
    if cfg.budget.wall_clock_s is not None:
        return ("its budget is training seconds, which a pack's members share: it would train "
                "fewer steps packed than solo")
    if cfg.train.activation_checkpointing:
        return "the stacked model does not checkpoint activations"
    if cfg.train.distributed.nproc > 1:
        return "it trains over several devices of its own (train.distributed)"
    if cfg.train.precision == "fp16":
        return "fp16's grad scaler skips steps for a whole run, not for one member"
    return None


@dataclass(frozen=True)
class Member:
    """A run to train in a pack: its id, its config, and its run directory."""

    run_id: str
    cfg: RunConfig
    run_dir: Path


@dataclass
class _Member:
    """A member while it trains: its :class:`~lmlab.train.loop.Run` and what the loop reads."""

    run: Run
    batcher: TrainBatcher
    schedule: Callable[[int, float], float]
    resumed: bool
    stop: StopReason | None = None


def train_pack(members: Sequence[Member], store: Store | Outbox, *,
               base: Path | None = None,
               on_log: Callable[[LogLine], None] | None = None,
               should_stop: Callable[[], bool] | None = None, data: DataBundle | None = None,
               ) -> list[RunResult]:
    """Train ``members`` as one stacked model; each resumes from its own checkpoint when it has
    one. Returns one result per member, in order."""
    # ---- set up: data once, then each member as a solo run sets itself up --------------------
    cfg0 = members[0].cfg
    for m in members:
        why = unpackable(m.cfg)
        if why is None and digest(m.cfg, "shape") != digest(cfg0, "shape"):
            why = f"its shape differs from {members[0].run_id}'s"
        if why is not None:
            raise UserError(f"run {m.run_id} cannot be packed: {why}", field="pack")
    device = resolve_device(cfg0.train.device)
    data = data or prepare_data(cfg0.data, cfg0.tokenizer, base)
    if len(data.splits["valid"]) < 2:
        raise UserError(f"the validation split of {data.corpus.name} is empty", field="data")
    ids = [m.run_id for m in members]
    live = [_set_up(m, ids, store, data, device) for m in members]
    wait: dict[int, float] = {}
    for m in live:
        m.run.recorder.pack_wait = wait
    results: dict[str, RunResult] = {}

    # ---- train: members resumed at one step train as one pack ---------------------------------
    for step in sorted({m.run.state.step for m in live}):
        group = [m for m in live if m.run.state.step == step]
        for result in _train_group(group, device, on_log, should_stop):
            results[result.run_id] = result
    return [results[i] for i in ids]


def _set_up(member: Member, pack: list[str], store: Store | Outbox, data: DataBundle,
            device: torch.device) -> _Member:
    cfg = member.cfg
    learner = build_learner(cfg, data.tokenizer.vocab_size, device)
    # The dropout stream a solo run would draw from (the global RNG right after its model was
    # built from its seed), now the member's own.
    generator = torch.Generator(device)
    if device.type == "cpu":
        generator.set_state(torch.get_rng_state())
    else:
        generator.manual_seed(cfg.train.init_seed_used)
    batcher = TrainBatcher(data.splits["train"], cfg.train.data_seed_used,
                           cfg.train.seq_len).to(device)
    probe_x = next(iter_eval_batches(data.splits["valid"], cfg.train.seq_len, 4, 1))[0]
    diagnostics = Diagnostics(cfg.evaluation.diagnostics, learner.raw, probe_x.to(device))
    state = RunState(generator=generator)
    recorder = Recorder(store, member.run_id, cfg, device, flops_per_token(learner, cfg))
    recorder.pack = pack
    resumed, damaged = _resume(member.run_dir, cfg, learner, state, recorder)
    recorder.start(state, resumed, _provenance(data, device) | {
        "packed": {"pack": pack, "members": len(pack), "index": pack.index(member.run_id)}})
    for aside in damaged:  # after start(): it drops the events past the resumed step
        recorder.event(state.at, Event.CHECKPOINT_DAMAGED, aside.detail())
    run = Run(member.run_id, cfg, member.run_dir, data, learner, diagnostics, state, recorder,
              eval_cadence(cfg.evaluation))
    return _Member(run, batcher, build_schedule(cfg.schedule), resumed)


def _train_group(group: list[_Member], device: torch.device,
                 on_log: Callable[[LogLine], None] | None,
                 should_stop: Callable[[], bool] | None) -> list[RunResult]:
    results: list[RunResult] = []
    active = list(group)
    stack, forward = _stack(active)
    keep_freed_memory(device)
    reset_peak(device)
    try:
        for m in active:
            if not m.resumed:
                r = m.run
                r.last_val = _evaluate(r.learner, r.data, r.cfg, r.state, r.recorder, VAL,
                                       full=False)
        while active:
            if should_stop is not None and should_stop():
                for m in active:
                    m.stop = StopReason.INTERRUPTED
                break
            state0, train0 = active[0].run.state, active[0].run.cfg.train
            # One shape for the pack (the members share it, ramps included, and are at one step).
            seq_len, batch = train0.seq_len_at(state0.step), train0.batch_size_at(state0.step)
            lrs, probing, before = [], [], []
            for m in active:
                r = m.run
                lrs.append(set_lr(r.learner.optimizer,
                                  m.schedule(r.state.step, r.state.progress(r.cfg.budget))))
                probing.append(r.diagnostics.due(r.state.step))
                before.append(r.diagnostics.snapshot() if probing[-1] else None)
            out = pack_step(stack, forward, [m.run.learner for m in active],
                            _pack_batches(active, batch, seq_len),
                            [m.run.diagnostics.grad_norms if p else None
                             for m, p in zip(active, probing, strict=True)])
            checkpoint_due = False
            for m, o, lr in zip(active, out.members, lrs, strict=True):
                r = m.run
                if o.finite is False:  # recorded at the step it would have been; not applied
                    at = r.state.attempted(batch, seq_len, o.seconds)
                    m.stop = r.recorder.non_finite(at, o.loss, o.grad_norm, lr, o.inspected)
                    continue
                r.state.advance(batch, seq_len, o.seconds)
                r.recorder.step(r.state.at, o.loss, o.grad_norm, lr, o.bad)
                at_end = r.state.progress(r.cfg.budget) >= 1.0
                checkpoint_due |= (r.state.step % r.cfg.cadence.checkpoint_every_steps == 0
                                   and not at_end)
            for m, o, p, b in zip(active, out.members, probing, before, strict=True):
                if m.stop is None:
                    m.stop = between_steps(m.run, o, p, b, checkpoint_due, on_log)
                if m.stop is None and m.run.state.progress(m.run.cfg.budget) >= 1.0:
                    m.stop = StopReason.BUDGET
            if checkpoint_due:  # all members at once, so the pack resumes as one
                for m in active:
                    if m.stop is None:
                        _checkpoint(m.run.run_dir, m.run.cfg, m.run.learner, m.run.state,
                                    m.run.recorder)
            done = [m for m in active if m.stop is not None]
            if done:
                active = [m for m in active if m.stop is None]
                for m in done:
                    results.append(wrap_up(m.run, None if m.stop is StopReason.BUDGET else m.stop))
                if active:  # rebuilt without them: no compute spent on a stopped member
                    stack, forward = _stack(active)
    except (torch.OutOfMemoryError, MemoryError) as e:
        # The pack's memory: every member still training stops over budget, with its rows.
        for m in active:
            m.run.learner.optimizer.zero_grad(set_to_none=True)
        stack.zero_grad()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for m in active:
            m.stop = m.run.recorder.settle(m.run.state) or \
                m.run.recorder.out_of_memory(m.run.state.at, e)
    for m in active:
        results.append(wrap_up(m.run, m.stop))
    return results


def _stack(active: list[_Member]) -> tuple[StackedGPT, CompileFallback]:
    stack = StackedGPT([m.run.learner.raw for m in active],
                       [m.run.state.generator for m in active])  # type: ignore[misc]

    def fallback(reason: str) -> None:
        for m in active:
            m.run.recorder.compile_fallback(m.run.state, reason)

    return stack, CompileFallback(stack.hidden, active[0].run.cfg.train.compile, fallback)


def _pack_batches(active: list[_Member], batch: int, seq_len: int) -> Iterator[list[MicroBatch]]:
    """Each member's micro-batches from its own place in its own data order, side by side."""
    streams = [_micro_batches(m.batcher, m.run.state.samples, batch, seq_len, m.run.cfg)
               for m in active]
    for micro in zip(*streams, strict=True):
        yield list(micro)
