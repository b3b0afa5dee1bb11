"""The training loop: one RunConfig in, one run's records in the store.

Reads top to bottom: set up (data, learner, resume) -> train until the budget is spent or
something stops the run -> wrap up (final evaluation, checkpoint, summary). One optimizer step is
:func:`lmlab.train.step.train_step`; everything written goes through the
:class:`lmlab.train.recorder.Recorder`, once per log interval (each row with its step, tokens seen
and training seconds). Evaluation, diagnostics and checkpoints happen between steps, outside the
timed part. Reports are never built here.
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
from lmlab.store.provenance import capture
from lmlab.train.checkpoint import SetAside, check_belongs, resume_checkpoint, save_checkpoint
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.evaluate import evaluate
from lmlab.train.memory import reset_peak
from lmlab.train.recorder import Interval, Recorder
from lmlab.train.state import RunState, StopReason, eval_cadence
from lmlab.train.step import Learner, MicroBatch, build_learner, resolve_device, train_step


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


def train(cfg: RunConfig, run_id: str, store: Store, run_dir: Path, *, base: Path | None = None,
          on_log: Callable[[LogLine], None] | None = None,
          should_stop: Callable[[], bool] | None = None, data: DataBundle | None = None,
          ) -> RunResult:
    """Train one configuration. Resumes from ``run_dir``'s checkpoint when there is one."""
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
    recorder = Recorder(store, run_id, cfg, device)
    resumed, damaged = _resume(run_dir, cfg, learner, state, recorder)
    recorder.start(state, resumed, _provenance(data, device))
    for aside in damaged:  # after start(): it drops the events past the resumed step
        recorder.event(state.at, Event.CHECKPOINT_DAMAGED, aside.detail())
    learner.forward = CompileFallback(learner.raw, cfg.train.compile,
                                      partial(recorder.compile_fallback, state))
    reset_peak(device)

    # ---- train until the budget is spent or something stops the run ---------------------------
    stop: StopReason | None = None
    last_val: float | None = None
    try:
        if not resumed:
            last_val = _evaluate(learner, data, cfg, state, recorder, VAL, full=False)
        while stop is None and state.progress(cfg.budget) < 1.0:
            if should_stop is not None and should_stop():
                stop = StopReason.INTERRUPTED
                break
            seq_len, batch = cfg.train.seq_len_at(state.step), cfg.train.batch_size_at(state.step)
            lr = set_lr(learner.optimizer, schedule(state.step, state.progress(cfg.budget)))
            probing = diagnostics.due(state.step)
            before = diagnostics.snapshot() if probing else None
            out = train_step(learner, _micro_batches(batcher, state.samples, batch, seq_len, cfg),
                             inspect=diagnostics.grad_norms if probing else None)
            if not out.finite:  # recorded at the step it would have been; nothing was applied
                at = state.attempted(batch, seq_len, out.seconds)
                stop = recorder.non_finite(at, out.loss, out.grad_norm, lr, out.inspected)
                break
            state.advance(batch, seq_len, out.seconds)
            recorder.step(state.at, out.loss, out.grad_norm, lr)

            # ---- between steps, untimed: probe, logging, evaluation, checkpoint ----
            if probing:
                after = diagnostics.update_ratios(before) if before is not None else {}
                recorder.metrics(state.at, out.inspected | after | diagnostics.probe())
            at_end = state.progress(cfg.budget) >= 1.0
            if state.step % cfg.cadence.log_every_steps == 0 or at_end:
                interval = recorder.flush()
                stop = recorder.check(interval)
                if on_log is not None and interval is not None:
                    on_log(_log_line(run_id, interval, cfg, last_val))
            if stop is None and (state.eval_due(cadence, cfg.budget) or at_end):
                # Evaluation rows never precede the train rows of their steps.
                stop = recorder.check(recorder.flush())
                if stop is None:
                    last_val = _evaluate(learner, data, cfg, state, recorder, VAL, full=at_end)
            if stop is None and state.step % cfg.cadence.checkpoint_every_steps == 0 and not at_end:
                _checkpoint(run_dir, cfg, learner, state, recorder)
    except (torch.OutOfMemoryError, MemoryError) as e:
        # Caught like an over-budget run: the sweep goes on. The rows of the steps already taken
        # are kept; the step that ran out of memory has none.
        learner.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stop = recorder.out_of_memory(state.at, e)

    # ---- wrap up --------------------------------------------------------------------------------
    if stop is None:  # the budget is spent; the final evaluation ran after the last check
        stop = recorder.over_memory(state.at) or StopReason.BUDGET
    if stop is StopReason.INTERRUPTED:
        # The rows not yet written travel in the checkpoint and are written after the resume.
        _checkpoint(run_dir, cfg, learner, state, recorder)
        recorder.event(state.at, Event.INTERRUPTED)
        recorder.finish(stop, {})
        return RunResult(run_id, str(stop.status), {})
    recorder.flush()
    if stop is StopReason.BUDGET:
        _checkpoint(run_dir, cfg, learner, state, recorder)  # a rerun has nothing left to do
        if cfg.evaluation.test_at_end:
            _evaluate(learner, data, cfg, state, recorder, TEST, full=True)
    summary = recorder.summary(state, stop) | {
        "n_params": sum(p.numel() for p in learner.raw.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(learner.optimizer),
        "optimizer_impl": getattr(learner.optimizer, "lmlab_impl", None),
    }
    recorder.finish(stop, summary)
    return RunResult(run_id, str(stop.status), summary)


def _micro_batches(batcher: TrainBatcher, start: int, batch: int, seq_len: int,
                   cfg: RunConfig) -> Iterator[MicroBatch]:
    """The step's ``batch`` sequences from sample ``start`` on, as micro-batches of at most
    ``train.micro_batch_size`` sequences, each weighted by its share of the step. Lazily: the
    step's timing includes reading its data."""
    for first in range(start, start + batch, cfg.train.micro_batch_size):
        n = min(cfg.train.micro_batch_size, start + batch - first)
        x, y = batcher.batch(first, n, seq_len)
        yield x, y, n / batch


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
    }


def _log_line(run_id: str, interval: Interval, cfg: RunConfig, val: float | None) -> LogLine:
    at = interval.at
    return LogLine(run_id, at.step, at.tokens, cfg.budget.progress(*at), interval.mean_loss,
                   interval.tokens_per_s, val)
