"""The training loop: one RunConfig in, one run's records in the store.

Reads top to bottom: set up (data, model, optimizer, resume) -> train until the budget is spent
-> final evaluation -> summary. Every log interval writes one transaction of metric rows (each
with step, tokens seen and training seconds); evaluation, diagnostics and checkpoints happen
between steps and outside the timed part. Reports are never built here.

One deliberate host sync per step: the finiteness of the loss and gradient norm is read before the
optimizer step, because a non-finite update must never be applied (it would corrupt the weights
the run's record describes). On CPU this costs nothing; on GPU it is a 1-byte read per step. The
per-step loss and global gradient norm (before clipping) stay on the device and are read together
once per log interval. Diagnostics add a few reads at their own cadence, outside the timed step.

When a run stops early its rows stay in the store and its status says why: ``diverged`` (a
non-finite loss or gradient norm, recorded as a ``nan`` event before the optimizer step would have
applied it; or a ``divergence`` event, the interval's loss above ``divergence_factor`` times the
first interval's), ``over_budget`` (peak memory above ``budget.max_memory_mb``, an ``over_budget``
event with the figure; or an out-of-memory error, an ``oom`` event). None of these raises, so a
sweep goes on with its next run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab import __version__
from lmlab.config import RunConfig
from lmlab.data.batches import TrainBatcher, iter_eval_batches
from lmlab.data.tokenize import DataBundle, SplitStats, prepare_data
from lmlab.errors import UserError
from lmlab.model import build_model, load_pretrained_gpt2
from lmlab.model.wrap import apply_activation_checkpointing, maybe_compile
from lmlab.optim import build_optimizer, build_schedule, optimizer_state_bytes, set_lr
from lmlab.store import Store
from lmlab.store.provenance import capture
from lmlab.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lmlab.train.diagnostics import Diagnostics, SpikeDetector
from lmlab.train.memory import MemoryPeak, read_peak, reset_peak


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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available", field="train.device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_run_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model: ``cfg.model`` freshly initialised, or GPT-2 weights when
    ``train.init_from`` is set (then the shape comes from the checkpoint, and ``cfg.model`` only
    contributes dropout, attention and sdpa_backend, which change no weights)."""
    tc = cfg.train
    if not tc.init_from:
        return build_model(cfg.model, vocab_size, tc.seq_len)
    if cfg.tokenizer.kind != "gpt2":
        raise UserError("init_from a pretrained GPT-2 needs tokenizer.kind: gpt2",
                        field="train.init_from")
    model = load_pretrained_gpt2(tc.init_from, dropout=cfg.model.dropout,
                                 attention=cfg.model.attention,
                                 sdpa_backend=cfg.model.sdpa_backend)
    if model.vocab_size < vocab_size:
        raise UserError(f"'{tc.init_from}' has a vocabulary of {model.vocab_size} tokens, fewer "
                        f"than the tokenizer's {vocab_size}", field="train.init_from")
    if tc.seq_len > model.max_seq_len:
        raise UserError(f"train.seq_len {tc.seq_len} is longer than the {model.max_seq_len} "
                        f"positions of '{tc.init_from}'", field="train.seq_len")
    return model


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_terms(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
               z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy as reported, objective that is minimised). Reported loss stays plain CE so
    arms with and without label smoothing or z-loss are compared on the same number."""
    flat, tgt = logits.float().flatten(0, 1), targets.flatten()
    ce = F.cross_entropy(flat, tgt)
    if label_smoothing == 0 and z_loss == 0:
        return ce, ce
    # The extras share one log-normaliser pass instead of a second full cross-entropy:
    # smoothed CE = (1 - eps) * CE + eps * mean over classes of -log p = ... + eps * (lse - mean).
    lse = torch.logsumexp(flat, dim=-1)
    objective = ce
    if label_smoothing > 0:
        uniform = (lse - flat.mean(dim=-1)).mean()
        objective = (1 - label_smoothing) * ce + label_smoothing * uniform
    if z_loss > 0:  # PaLM's auxiliary loss: keeps the softmax normaliser near 1
        objective = objective + z_loss * lse.pow(2).mean()
    return ce, objective


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: Any, stats: SplitStats, seq_len: int, batch_size: int,
             max_batches: int | None, device: torch.device, precision: str) -> dict[str, float]:
    """Loss over non-overlapping windows of the split; the full split unless max_batches caps it.

    Besides loss and perplexity: bits per byte and word-level perplexity (total NLL over the
    split's whitespace-separated words, as lm-evaluation-harness's wikitext task defines it), which
    stay comparable across tokenizers.
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in iter_eval_batches(tokens, seq_len, batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            logits = model(x)
        nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        n += y.numel()
    model.train(was_training)
    total = nll.item()
    loss = total / n
    # On a capped evaluation the NLL of the whole split is extrapolated from the per-token loss.
    split_nll = total if max_batches is None else loss * max(stats.n_tokens - 1, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": split_nll / (math.log(2) * stats.n_bytes),
        "word_ppl": math.exp(min(split_nll / stats.n_words, 700.0)),
        "tokens": float(n),
    }


class _Cadence:
    """Fires each time a monotone quantity (tokens, steps, seconds, progress) crosses the next
    multiple of ``every``."""

    def __init__(self, every: float, next_at: float | None = None) -> None:
        self.every = every
        self.next_at = every if next_at is None else next_at

    def due(self, value: float) -> bool:
        if value + 1e-12 < self.next_at:
            return False
        while self.next_at <= value + 1e-12:
            self.next_at += self.every
        return True


def _eval_cadence(cfg: RunConfig) -> tuple[str, _Cadence]:
    e = cfg.eval
    if e.every_tokens:
        return "tokens", _Cadence(e.every_tokens)
    if e.every_steps:
        return "step", _Cadence(e.every_steps)
    if e.every_seconds:
        return "train_s", _Cadence(e.every_seconds)
    return "progress", _Cadence(0.1)  # default: ten evaluations through the run


def train(cfg: RunConfig, run_id: str, store: Store, run_dir: Path, *, base: Path | None = None,
          on_log: Callable[[LogLine], None] | None = None,
          should_stop: Callable[[], bool] | None = None, data: DataBundle | None = None,
          ) -> RunResult:
    """Train one configuration. Resumes from ``run_dir``'s checkpoint when there is one."""
    tc, dc = cfg.train, cfg.diagnostics
    device = resolve_device(tc.device)
    wall_start = time.perf_counter()

    # ---- data, model, optimizer ----------------------------------------------------------------
    data = data or prepare_data(cfg.data, cfg.tokenizer, base)
    torch.manual_seed(tc.seed)
    model = build_run_model(cfg, data.tokenizer.vocab_size)
    model.to(device)
    raw_model = model
    apply_activation_checkpointing(raw_model, tc.activation_checkpointing)
    optimizer = build_optimizer(cfg.optimizer, raw_model, device.type)
    schedule = build_schedule(cfg.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    params = [p for p in raw_model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params] if tc.ema_decay else None

    batcher = TrainBatcher(data.splits["train"], tc.seed, tc.seq_len)
    if len(data.splits["valid"]) < 2:
        raise UserError(f"the validation split of {data.corpus.name} is empty", field="data")
    probe_x = next(iter_eval_batches(data.splits["valid"], tc.seq_len, 4, 1))[0].to(device)
    diag = Diagnostics(dc, raw_model, probe_x)
    spikes = SpikeDetector.from_config(dc)
    budget = cfg.budget
    eval_on, eval_cadence = _eval_cadence(cfg)

    # ---- counters, or the checkpoint's -------------------------------------------------------
    step = samples = tokens = 0
    train_s = 0.0
    early_loss: float | None = None
    pending: list[tuple[int, int, float, float, float, float]] = []  # step, tokens, s, loss, gnorm, lr
    earlier_peak, earlier_wall = 0, 0.0
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None and ckpt["config_hash"] != cfg.config_hash:
        raise UserError(f"{run_dir} holds a checkpoint of a different config "
                        f"({ckpt['config_hash']}, not {cfg.config_hash}); it is kept: use another "
                        "output directory")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            for e, v in zip(ema, ckpt["ema"], strict=True):
                e.copy_(v)
        step, samples, tokens, train_s = ckpt["step"], ckpt["samples"], ckpt["tokens"], ckpt["train_s"]
        early_loss = ckpt["early_loss"]
        pending = ckpt["pending"]
        spikes.load_state_dict(ckpt["spikes"])
        eval_cadence.next_at = ckpt["eval_next_at"]
        set_rng_state(ckpt["rng"])
        # Segments before the resume count too: the run's peak and wall-clock are over all of it.
        earlier_peak, earlier_wall = ckpt.get("peak_mem_bytes", 0), ckpt.get("wall_s", 0.0)
    # Rows written after the checkpoint (a killed run) are dropped: the resumed run rewrites them.
    store.truncate_after(run_id, step if ckpt is not None else -1)
    if ckpt is not None:
        store.log_event(run_id, step, tokens, train_s, "resume", {"from_step": step})
    store.set_provenance(run_id, capture() | {
        "corpus": data.corpus.name, "is_wikitext2": data.corpus.is_wikitext2,
        "data_hash": data.corpus.hash, "data_sha256": data.corpus.sha256,
        "tokenizer_hash": data.tokenizer.hash, "vocab_size": data.tokenizer.vocab_size,
        "device": str(device), "lmlab_version": __version__,
    })
    store.set_status(run_id, "running")
    model, compile_note = maybe_compile(raw_model, tc.compile)
    if compile_note:
        store.log_event(run_id, step, tokens, train_s, "compile_fallback", {"reason": compile_note})
    compiled_ok = tc.compile == "off" or compile_note is not None
    reset_peak(device)
    autocast = autocast_context(device, tc.precision)
    max_mem = cfg.budget.max_memory_mb * 2**20 if cfg.budget.max_memory_mb else None
    last_eval: dict[str, float] = {}
    status = "completed"
    reason: dict[str, Any] = {}

    def log_eval(split: str = "valid", full: bool = False) -> dict[str, float]:
        """Evaluate and log; ``full`` ignores eval.max_batches (the final numbers are exact)."""
        if ema is not None:  # evaluate the EMA weights, then put the training weights back
            live = [p.detach().clone() for p in params]
            for p, e in zip(params, ema, strict=True):
                p.data.copy_(e)
        tokens_arr = data.splits[split]
        # The eager model: torch.compile is a training-speed knob, and a compile failure must
        # surface in the training step's fallback, not crash the step-0 evaluation.
        result = evaluate(raw_model, tokens_arr, data.stats[split], tc.seq_len,
                          cfg.eval.batch_size, None if full else cfg.eval.max_batches, device,
                          tc.precision)
        if ema is not None:
            for p, v in zip(params, live, strict=True):
                p.data.copy_(v)
        prefix = "val" if split == "valid" else split
        store.log_metrics(run_id, step, tokens, train_s, {
            f"{prefix}_{k}": v for k, v in result.items() if k != "tokens"})
        return result

    def checkpoint() -> None:
        _to_host(pending)
        save_checkpoint(run_dir, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema, "step": step, "samples": samples,
            "tokens": tokens, "train_s": train_s, "early_loss": early_loss, "pending": pending,
            "spikes": spikes.state_dict(), "eval_next_at": eval_cadence.next_at, "rng": rng_state(),
            "config_hash": cfg.config_hash,
            "peak_mem_bytes": max(earlier_peak, read_peak(device).peak_bytes),
            "wall_s": earlier_wall + time.perf_counter() - wall_start,
        })

    def check_memory(peak: MemoryPeak, at: tuple[int, int, float]) -> None:
        """Stop the run (over_budget, with the figure) when its peak memory passed the budget."""
        nonlocal status, reason
        if max_mem is None or peak.peak_bytes <= max_mem:
            return
        detail = {"peak_mem_bytes": peak.peak_bytes, "peak_mem_kind": peak.kind,
                  "max_memory_mb": cfg.budget.max_memory_mb}
        store.log_event(run_id, *at, "over_budget", detail)
        status, reason = "over_budget", {"reason": "peak memory above budget.max_memory_mb",
                                         "peak_mem_bytes": peak.peak_bytes}

    def flush() -> tuple[float, float]:
        """Write the pending per-step rows plus the interval's speed and memory in one transaction,
        and run the stability detectors on the per-step losses. Returns (mean loss, tokens/s)."""
        nonlocal early_loss, status, reason, prev_point
        _to_host(pending)
        rows = []
        for s, t, w, loss, gnorm, lr in pending:
            rows.append((s, t, w, {"train_loss": loss, "grad_norm": gnorm, "lr": lr}))
            spike = spikes.update(s, loss)
            if spike:
                store.log_event(run_id, s, t, w, "spike", spike)
        last = pending[-1]
        peak = read_peak(device)
        interval = {"peak_mem_bytes": float(peak.peak_bytes)}
        if peak.reserved_bytes is not None:
            interval["peak_mem_reserved_bytes"] = float(peak.reserved_bytes)
        interval.update(_interval_speed(prev_point, last))
        rows[-1][3].update(interval)
        store.log_many(run_id, rows)
        mean_loss = sum(r[3] for r in pending) / len(pending)
        if status != "completed":
            pass  # already stopping (non-finite step): its event is recorded
        elif early_loss is None:
            early_loss = mean_loss
        elif not mean_loss <= dc.divergence_factor * early_loss:  # also catches NaN
            store.log_event(run_id, last[0], last[1], last[2], "divergence",
                            {"loss": mean_loss, "early_loss": early_loss,
                             "factor": dc.divergence_factor})
            status, reason = "diverged", {"reason": "loss above divergence_factor x early loss"}
        if status == "completed":
            check_memory(peak, last[:3])
        pending.clear()
        prev_point = (last[0], last[1], last[2])
        return mean_loss, interval.get("tokens_per_s", 0.0)

    prev_point = (step, tokens, train_s)  # where the current log interval started

    # ---- the loop --------------------------------------------------------------------------------
    try:
        if ckpt is None and step == 0:
            last_eval = log_eval()
        while (progress := budget.progress(step, tokens, train_s)) < 1.0 and status == "completed":
            if should_stop is not None and should_stop():
                status = "interrupted"
                break
            seq_len, batch = tc.seq_len_at(step), tc.batch_size_at(step)
            lr_mult = schedule(step, progress)
            set_lr(optimizer, lr_mult)
            probing = diag.due(step)
            before = diag.snapshot() if probing else None

            t0 = time.perf_counter()
            loss = torch.zeros((), device=device)
            start = samples
            while start < samples + batch:  # micro-batches of at most micro_batch_size sequences
                n = min(tc.micro_batch_size, samples + batch - start)
                x, y = batcher.batch(start, n, seq_len)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                try:
                    with autocast:
                        logits = model(x)
                except Exception as e:  # torch.compile can fail on the first real call
                    if compiled_ok:
                        raise
                    store.log_event(run_id, step, tokens, train_s, "compile_fallback",
                                    {"reason": f"{type(e).__name__}: {e}"[:2000]})
                    model, compiled_ok = raw_model, True
                    with autocast:
                        logits = model(x)
                compiled_ok = True
                ce, objective = loss_terms(logits, y, tc.label_smoothing, tc.z_loss)
                scaler.scale(objective * (n / batch)).backward()
                loss += ce.detach() * (n / batch)
                start += n
            scaler.unscale_(optimizer)
            # The global norm before clipping (what clip_grad_norm_ computes and returns), kept on
            # the device; clipping, when configured, reuses it after the finiteness check.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # With fp16 the scaler skips steps with inf/NaN gradients by design; only the loss counts.
            finite = torch.isfinite(loss) if scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
            ok = bool(finite)  # the one per-step host sync (see module docstring)
            step_s = time.perf_counter() - t0
            probe_rows = diag.grad_norms() if probing else {}  # untimed; gradients before clipping
            if not ok:  # record the event first, then stop: no optimizer step applies this update
                at = (step + 1, tokens + batch * seq_len, train_s + step_s)
                bad_loss, bad_norm = loss.item(), grad_norm.item()
                store.log_event(run_id, *at, "nan",
                                {"loss": bad_loss, "grad_norm": bad_norm,
                                 "note": "stopped before the optimizer step"})
                train_s = at[2]
                pending.append((*at, bad_loss, bad_norm, optimizer.param_groups[0]["lr"]))
                if probe_rows:  # where the non-finite gradient sits, block by block
                    store.log_metrics(run_id, *at, probe_rows)
                status, reason = "diverged", {"reason": "non-finite loss or gradient norm"}
                break
            t1 = time.perf_counter()
            if tc.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, tc.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - tc.ema_decay)
            step_s += time.perf_counter() - t1
            step, samples, tokens = step + 1, samples + batch, tokens + batch * seq_len
            train_s += step_s
            pending.append((step, tokens, train_s, loss, grad_norm, optimizer.param_groups[0]["lr"]))

            # ---- between steps: logging, probe, evaluation, checkpoint (untimed) ----
            if probing:
                if before is not None:
                    probe_rows.update(diag.update_ratios(before))
                probe_rows.update(diag.probe())
                store.log_metrics(run_id, step, tokens, train_s, probe_rows)
            at_end = budget.progress(step, tokens, train_s) >= 1.0
            if step % cfg.eval.log_every_steps == 0 or at_end:
                mean_loss, tok_s = flush()
                if on_log:
                    on_log(LogLine(run_id, step, tokens, budget.progress(step, tokens, train_s),
                                   mean_loss, tok_s, last_eval.get("loss")))
            if status != "completed":
                break
            value = {"tokens": tokens, "step": step, "train_s": train_s,
                     "progress": budget.progress(step, tokens, train_s)}[eval_on]
            if eval_cadence.due(value) or at_end:
                if pending:  # evaluation rows never precede the train rows of their steps
                    flush()
                last_eval = log_eval(full=at_end)
            if step % cfg.eval.checkpoint_every_steps == 0 and not at_end:
                checkpoint()
    except (torch.OutOfMemoryError, MemoryError) as e:
        # Caught like an over-budget run: the sweep goes on. The rows of the steps already taken
        # (pending) are kept; the step that ran out of memory has none.
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        peak = read_peak(device)
        store.log_event(run_id, step, tokens, train_s, "oom",
                        {"error": f"{type(e).__name__}: {e}"[:2000], "peak_mem_bytes": peak.peak_bytes,
                         "peak_mem_kind": peak.kind, "max_memory_mb": cfg.budget.max_memory_mb})
        status, reason = "over_budget", {"reason": "out of memory", "peak_mem_bytes": peak.peak_bytes}

    # ---- wrap up ----------------------------------------------------------------------------------
    if status == "completed":  # the final evaluation ran after the last interval's check
        check_memory(read_peak(device), (step, tokens, train_s))
    if status == "interrupted":
        checkpoint()  # pending rows travel in the checkpoint and are written after the resume
    elif pending:
        flush()
    if status == "interrupted":
        store.log_event(run_id, step, tokens, train_s, "interrupted", {})
        store.set_status(run_id, "interrupted")
        return RunResult(run_id, "interrupted", {})
    if status == "completed":
        checkpoint()  # the final state: a rerun of a completed run has nothing left to do
    summary = _summary(store, run_id, raw_model, optimizer, step, tokens, train_s,
                       earlier_wall + time.perf_counter() - wall_start, device, earlier_peak)
    if cfg.eval.test_at_end and status == "completed":
        test = log_eval("test", full=True)
        summary.update({f"test_{k}": v for k, v in test.items() if k != "tokens"})
    summary.update(reason)
    store.set_status(run_id, status, summary=summary)
    return RunResult(run_id, status, summary)


def _to_host(pending: list) -> None:
    """Replace the per-step loss / grad-norm tensors in ``pending`` by floats, in one device read."""
    live = [i for i, r in enumerate(pending) if isinstance(r[3], torch.Tensor)]
    if not live:
        return
    values = torch.stack([torch.stack([pending[i][3].float(), pending[i][4].float()])
                          for i in live]).tolist()
    for i, (loss, gnorm) in zip(live, values, strict=True):
        s, t, w, _, _, lr = pending[i]
        pending[i] = (s, t, w, loss, gnorm, lr)


def _interval_speed(prev: tuple[int, int, float], last: tuple) -> dict[str, float]:
    """Step time and tokens/sec over one log interval (training time only)."""
    steps = last[0] - prev[0]
    seconds = last[2] - prev[2]
    if steps <= 0 or seconds <= 0:
        return {}
    return {"step_time_s": seconds / steps, "tokens_per_s": (last[1] - prev[1]) / seconds}


def _summary(store: Store, run_id: str, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, step: int, tokens: int, train_s: float,
             wall_s: float, device: torch.device, earlier_peak: int) -> dict[str, Any]:
    peak = read_peak(device)
    out: dict[str, Any] = {
        "steps": step, "tokens": tokens, "train_s": train_s, "wall_s": wall_s,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "peak_mem_bytes": max(peak.peak_bytes, earlier_peak), "peak_mem_kind": peak.kind,
        "peak_mem_reserved_bytes": peak.reserved_bytes,
        "n_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "optimizer_impl": getattr(optimizer, "lmlab_impl", None),
    }
    for name in ("val_loss", "val_ppl", "val_bpb", "val_word_ppl"):
        out[f"final_{name}"] = store.last_metric(run_id, name)
    return out
