"""The training loop: one RunConfig in, one run's records in the store.

Reads top to bottom: set up (data, learner, resume) -> train until the budget is spent or
something stops the run -> wrap up (final evaluation, checkpoint, summary). One optimizer step is
:func:`lmlab.train.step.train_step`; everything written goes through the
:class:`lmlab.train.recorder.Recorder`, once per log interval (each row with its step, tokens seen
and training seconds). Evaluation, diagnostics and checkpoints happen between steps, outside the
timed part (:func:`between_steps`); the end is :func:`wrap_up`. A packed run
(:mod:`lmlab.train.pack`) calls the same two for each of its members. Reports are never built
here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmlab import __version__
from lmlab.config import RunConfig
from lmlab.data.batches import TrainBatcher, iter_eval_batches
from lmlab.data.tokenize import DataBundle, prepare_data
from lmlab.errors import UserError
from lmlab.model.wrap import CompileFallback
from lmlab.names import TEST, VAL, Event
from lmlab.optim import build_schedule, optimizer_state_bytes, set_lr
from lmlab.store import Store
from lmlab.store.ingest import Outbox
from lmlab.store.provenance import capture
from lmlab.train.checkpoint import SetAside, check_belongs, resume_checkpoint, save_checkpoint
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.distributed import current, rank_share, stop_agreed
from lmlab.train.evaluate import evaluate
from lmlab.train.memory import keep_freed_memory, reset_peak
from lmlab.train.recorder import Interval, Recorder
from lmlab.train.state import RunState, StopReason, eval_cadence
from lmlab.train.step import (
    Learner,
    MicroBatch,
    StepOutput,
    build_learner,
    resolve_device,
    train_step,
)


@dataclass
class LogLine:
    """What a progress display needs after each log interval."""

    run_id: str
    step: int
    tokens: int
    progress: float
    train_loss: float
    tokens_per_s: float
    val_loss: float | None = None


@dataclass
class RunResult:
    run_id: str
    status: str
    summary: dict[str, Any]


@dataclass
class Run:
    """One run's parts while it trains: what happens between two optimizer steps
    (:func:`between_steps`) and at the end (:func:`wrap_up`) acts on them. A solo run has one;
    a packed run has one per member (:mod:`lmlab.train.pack`), so both do these the same way."""

    run_id: str
    cfg: RunConfig
    run_dir: Path
    data: DataBundle
    learner: Learner
    diagnostics: Diagnostics
    state: RunState
    recorder: Recorder
    cadence: tuple[str, float]  # the evaluation cadence (``eval_cadence``)
    last_val: float | None = None  # the last validation loss, for progress lines


def train(cfg: RunConfig, run_id: str, store: Store | Outbox, run_dir: Path, *,
          base: Path | None = None, on_log: Callable[[LogLine], None] | None = None,
          should_stop: Callable[[], bool] | None = None, data: DataBundle | None = None,
          ) -> RunResult:
    """Train one configuration. Resumes from ``run_dir``'s checkpoint when there is one.
    ``store``: where its records go, this host's store or (a remote worker) the outboxes."""
    # ---- set up: data, learner, and the checkpoint's state when resuming -----------------------
    device = resolve_device(cfg.train.device)
    data = data or prepare_data(cfg.data, cfg.tokenizer, base)
    if len(data.splits["valid"]) < 2:
        raise UserError(f"the validation split of {data.corpus.name} is empty", field="data")
    learner = build_learner(cfg, data.tokenizer.vocab_size, device)
    batcher = TrainBatcher(data.splits["train"], cfg.train.data_seed_used, cfg.train.seq_len)
    probe_x = next(iter_eval_batches(data.splits["valid"], cfg.train.seq_len, 4, 1))[0]
    diagnostics = Diagnostics(cfg.evaluation.diagnostics, learner.raw, probe_x.to(device))
    schedule = build_schedule(cfg.schedule)
    cadence = eval_cadence(cfg.evaluation)
    state = RunState()
    recorder = Recorder(store, run_id, cfg, device, flops_per_token(learner, cfg))
    resumed, damaged = _resume(run_dir, cfg, learner, state, recorder)
    recorder.start(state, resumed, _provenance(data, device))
    for aside in damaged:  # after start(): it drops the events past the resumed step
        recorder.event(state.at, Event.CHECKPOINT_DAMAGED, aside.detail())
    learner.forward = CompileFallback(learner.forward, cfg.train.compile,
                                      partial(recorder.compile_fallback, state))
    batcher.to(device)  # a GPU gathers its batches from tokens already there
    keep_freed_memory(device)
    reset_peak(device)

    run = Run(run_id, cfg, run_dir, data, learner, diagnostics, state, recorder, cadence)

    # ---- train until the budget is spent or something stops the run ---------------------------
    stop: StopReason | None = None
    try:
        if not resumed:
            run.last_val = _evaluate(learner, data, cfg, state, recorder, VAL, full=False)
        while stop is None and state.progress(cfg.budget) < 1.0:
            if should_stop is not None and stop_agreed(should_stop, state.step,
                                                       cfg.cadence.log_every_steps):
                stop = StopReason.INTERRUPTED
                break
            seq_len, batch = cfg.train.seq_len_at(state.step), cfg.train.batch_size_at(state.step)
            lr = set_lr(learner.optimizer, schedule(state.step, state.progress(cfg.budget)))
            probing = diagnostics.due(state.step)
            before = diagnostics.snapshot() if probing else None
            out = train_step(learner, _micro_batches(batcher, state.samples, batch, seq_len, cfg),
                             inspect=diagnostics.grad_norms if probing else None)
            if out.finite is False:  # recorded at the step it would have been; nothing applied
                at = state.attempted(batch, seq_len, out.seconds)
                stop = recorder.non_finite(at, out.loss, out.grad_norm, lr, out.inspected)
                break
            state.advance(batch, seq_len, out.seconds)
            recorder.step(state.at, out.loss, out.grad_norm, lr, out.bad)
            at_end = state.progress(cfg.budget) >= 1.0
            checkpoint_due = state.step % cfg.cadence.checkpoint_every_steps == 0 and not at_end
            stop = between_steps(run, out, probing, before, checkpoint_due, on_log)
            if stop is None and checkpoint_due:
                _checkpoint(run_dir, cfg, learner, state, recorder)
    except (torch.OutOfMemoryError, MemoryError) as e:
        # Caught like an over-budget run: the sweep goes on. The rows of the steps already taken
        # are kept; the step that ran out of memory has none.
        learner.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stop = recorder.settle(state) or recorder.out_of_memory(state.at, e)
    return wrap_up(run, stop)


def between_steps(run: Run, out: StepOutput, probing: bool, before: dict[str, torch.Tensor] | None,
                  checkpoint_due: bool, on_log: Callable[[LogLine], None] | None,
                  ) -> StopReason | None:
    """Untimed, after an applied step: the probe, logging (and the checks on what is logged),
    evaluation. Returns why the run stops, or None. A checkpoint, when due, is the caller's next
    move (``checkpoint_due`` only makes sure there is nothing unread before it)."""
    cfg, state, recorder, diagnostics = run.cfg, run.state, run.recorder, run.diagnostics
    at_end = state.progress(cfg.budget) >= 1.0
    log_due = state.step % cfg.cadence.log_every_steps == 0 or at_end
    eval_due = state.eval_due(run.cadence, cfg.budget) or at_end
    if probing or log_due or eval_due or checkpoint_due:
        # Before anything is written: with the device-side check, the steps' finiteness is read
        # here (a non-finite one stops the run at its own step).
        stop = recorder.settle(state, out.inspected)
        if stop is not None:
            return stop
    if probing:
        after = diagnostics.update_ratios(before) if before is not None else {}
        recorder.metrics(state.at, out.inspected | after | diagnostics.probe())
    stop = None
    if log_due:
        interval = recorder.flush()
        stop = recorder.check(interval)
        if on_log is not None and interval is not None:
            on_log(_log_line(run.run_id, interval, cfg, run.last_val))
    if stop is None and eval_due:
        # Evaluation rows never precede the train rows of their steps.
        stop = recorder.check(recorder.flush())
        if stop is None:
            run.last_val = _evaluate(run.learner, run.data, cfg, state, recorder, VAL, full=at_end)
    return stop


def wrap_up(run: Run, stop: StopReason | None) -> RunResult:
    """The run's end: what it stopped for, its last rows, the final checkpoint and test
    evaluation of a completed run, its summary and status."""
    cfg, learner, state, recorder = run.cfg, run.learner, run.state, run.recorder
    stop = recorder.settle(state) or stop  # a non-finite step not yet read happened first
    if stop is None:  # the budget is spent; the final evaluation ran after the last check
        stop = recorder.over_memory(state.at) or StopReason.BUDGET
    if stop is StopReason.INTERRUPTED:
        # The rows not yet written travel in the checkpoint and are written after the resume.
        _checkpoint(run.run_dir, cfg, learner, state, recorder)
        recorder.event(state.at, Event.INTERRUPTED)
        recorder.finish(stop, {})
        return RunResult(run.run_id, str(stop.status), {})
    recorder.flush()
    if stop is StopReason.BUDGET:
        _checkpoint(run.run_dir, cfg, learner, state, recorder)  # a rerun has nothing left to do
        if cfg.evaluation.test_at_end:
            _evaluate(learner, run.data, cfg, state, recorder, TEST, full=True)
    summary = recorder.summary(state, stop) | {
        "n_params": sum(p.numel() for p in learner.raw.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(learner.optimizer),
        "optimizer_impl": getattr(learner.optimizer, "lmlab_impl", None),
        "nonfinite_check": "device" if learner.device_check else "host",
    }
    recorder.finish(stop, summary)
    return RunResult(run.run_id, str(stop.status), summary)


def flops_per_token(learner: Learner, cfg: RunConfig) -> float | None:
    """Training FLOPs per token of the run's model at its (final) sequence length, for MFU."""
    count = getattr(learner.raw, "flops_per_token", None)
    return count(cfg.train.seq_len) if callable(count) else None


def _micro_batches(batcher: TrainBatcher, start: int, batch: int, seq_len: int,
                   cfg: RunConfig) -> Iterator[MicroBatch]:
    """The step's ``batch`` sequences from sample ``start`` on, as micro-batches of at most
    ``train.micro_batch_size`` sequences, each weighted by its share of the step. Lazily: the
    step's timing includes reading its data. One rank of a data-parallel run reads its share
    of them (``rank_share``; all of them alone)."""
    offset, share = rank_share(batch)
    end = start + offset + share
    for first in range(start + offset, end, cfg.train.micro_batch_size):
        n = min(cfg.train.micro_batch_size, end - first)
        x, y = batcher.batch(first, n, seq_len)
        yield x, y, n / share


def _evaluate(learner: Learner, data: DataBundle, cfg: RunConfig, state: RunState,
              recorder: Recorder, split: str, *, full: bool) -> float:
    """Evaluate ``split`` and record it; ``full`` ignores evaluation.max_batches (the final
    numbers are exact). The eager model is evaluated: torch.compile is a training-speed knob, and
    a compile failure must surface in the training step's fallback, not here."""
    split_name = "valid" if split == VAL else split
    with learner.evaluation_weights() as model:
        result = evaluate(model, data.splits[split_name], data.stats[split_name],
                          cfg.train.seq_len, cfg.evaluation.batch_size,
                          None if full else cfg.evaluation.max_batches, learner.device,
                          cfg.train.precision)
    recorder.evaluation(state.at, split, result)
    return result["loss"]


def _checkpoint(run_dir: Path, cfg: RunConfig, learner: Learner, state: RunState,
                recorder: Recorder) -> None:
    save_checkpoint(run_dir, cfg, {"learner": learner.state_dict(), "state": state.state_dict(),
                                   "recorder": recorder.state_dict()})


def _resume(run_dir: Path, cfg: RunConfig, learner: Learner, state: RunState,
            recorder: Recorder) -> tuple[bool, list[SetAside]]:
    """Load ``run_dir``'s newest whole checkpoint into the learner, state and recorder. Returns
    whether there was one, and the damaged checkpoints set aside to get to it (the run then
    goes on from the one before, or from the start). A checkpoint of another config, or one
    that would need code to load, is refused (and kept)."""
    ckpt, damaged = resume_checkpoint(run_dir)
    if ckpt is None:
        return False, damaged
    check_belongs(ckpt, cfg, run_dir)
    learner.load_state_dict(ckpt["learner"])
    state.load_state_dict(ckpt["state"])
    recorder.load_state_dict(ckpt["recorder"])
    return True, damaged


def _provenance(data: DataBundle, device: torch.device) -> dict[str, Any]:
    return capture() | {
        "corpus": data.corpus.name, "is_wikitext2": data.corpus.is_wikitext2,
        "data_hash": data.corpus.hash, "data_sha256": data.corpus.sha256,
        "tokenizer_hash": data.tokenizer.hash, "vocab_size": data.tokenizer.vocab_size,
        "device": str(device), "lmlab_version": __version__,
        "world_size": current()[1],  # data-parallel ranks (lmlab.train.distributed)
    }


def _log_line(run_id: str, interval: Interval, cfg: RunConfig, val: float | None) -> LogLine:
    at = interval.at
    return LogLine(run_id, at.step, at.tokens, cfg.budget.progress(*at), interval.mean_loss,
                   interval.tokens_per_s, val)
