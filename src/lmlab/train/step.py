"""One optimizer step, the same for the training loop, the Overfit Sanity preflight, the plan's
timing runs and, member by member, a packed run: the model and what updates it (a
:class:`Learner`), :func:`train_step`, and :func:`pack_step` for the members of a pack.

A non-finite update must never be applied (it would corrupt the weights the run's record
describes). Two ways to guarantee it (``train.nonfinite_check``):

- ``host``: the finiteness of the loss and the gradient norm is read on the host before the
  optimizer step, one sync per step. Free on CPU; a pipeline stall per step on a GPU.
- ``device``: the flag stays on the device and is handed to the optimizer as ``found_inf``,
  which makes torch's fused AdamW and SGD kernels skip the update (weights, moments and step
  count untouched). The flag is sticky: after a non-finite step no later update is applied
  either, so when the Recorder reads the flags at the log interval
  (:meth:`~lmlab.train.recorder.Recorder.settle`) the run stops at the step it happened, as if
  it had been read at once. Only optimizers that accept ``found_inf`` can do this (torch's fused
  Adam/AdamW/SGD); Lion, Muon, Adafactor and the foreach/plain implementations keep the sync.
- ``auto`` (default): ``device`` on CUDA where the optimizer allows it, else ``host``.

The loss and the gradient norm stay on the device either way; the Recorder reads them once per
log interval.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.config import RunConfig, TrainConfig
from lmlab.errors import UserError
from lmlab.model import build_model, load_pretrained_gpt2
from lmlab.model.stacked import StackedGPT
from lmlab.model.wrap import apply_activation_checkpointing
from lmlab.optim import build_optimizer, skips_on_device
from lmlab.train.distributed import (
    Parallel,
    data_parallel,
    full_state,
    last_marked,
    load_full_state,
    shard_like,
    whole,
)
from lmlab.train.loss import linear_cross_entropy

# A micro-batch: inputs, targets and its share of the step's sequences (its loss weight).
MicroBatch = tuple[Tensor, Tensor, float]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available", field="train.device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_run_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
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


@dataclass
class Learner:
    """The model and everything that updates it.

    ``raw`` is the eager model: checkpoints, optimizer groups, diagnostics and evaluation use it.
    ``forward`` is what the training step calls, tokens to final hidden states: ``raw.hidden``,
    or a compiled wrapper around it (set by the loop with
    :class:`lmlab.model.wrap.CompileFallback`); the head is applied by the fused loss.
    ``found_inf`` is the sticky device-side flag when ``device_check`` is on (see the module
    docstring), else None.
    """

    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[Tensor]
    ema: list[Tensor] | None  # exponential moving average of the weights (train.ema_decay)
    train: TrainConfig
    device: torch.device
    forward: Callable[[Tensor], Tensor]
    found_inf: Tensor | None = None
    parallel: Parallel | None = None  # one rank of a data-parallel run (lmlab.train.distributed)

    @property
    def device_check(self) -> bool:
        return self.found_inf is not None

    @property
    def head(self) -> Tensor:
        """The output projection's weight [vocab, d_model] (the token embedding when tied)."""
        return self.raw.lm_head.weight

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.train.precision)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[nn.Module]:
        """The model to evaluate: with EMA, the averaged weights swapped in for the duration."""
        if self.ema is None:
            yield self.raw
            return
        live = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.ema, strict=True):
            p.data.copy_(e)
        try:
            yield self.raw
        finally:
            for p, v in zip(self.params, live, strict=True):
                p.data.copy_(v)

    @property
    def sharded(self) -> bool:
        """Whether the weights are sharded over the ranks (``train.distributed.strategy: fsdp``)."""
        return self.parallel is not None and self.parallel.sharded

    def state_dict(self) -> dict[str, Any]:
        if self.sharded:  # gathered whole on rank 0 (a collective: every rank calls it)
            model_state, optimizer_state = full_state(self.raw, self.optimizer)
            ema = None if self.ema is None else [whole(e).cpu() for e in self.ema]
            return {"model": model_state, "optimizer": optimizer_state,
                    "scaler": self.scaler.state_dict(), "ema": ema}
        # A packed member's weights are views into the pack's stacks: saved as their own copies
        # (one per tensor, so a tied weight stays one), or torch.save would write every member's
        # weights into each checkpoint.
        model, copies = self.raw.state_dict(), {}
        for k, v in model.items():
            if _shares_storage(v):
                model[k] = copies.setdefault(v.data_ptr(), v.clone())
        return {"model": model, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            load_full_state(self.raw, self.optimizer, state["model"], state["optimizer"])
        else:
            self.raw.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            for e, v in zip(self.ema, state["ema"], strict=True):
                e.copy_(shard_like(v, e))


def _shares_storage(t: Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def device_check(tc: TrainConfig, device: torch.device, optimizer: torch.optim.Optimizer) -> bool:
    """Whether non-finite steps are skipped on the device (``train.nonfinite_check``)."""
    able = skips_on_device(optimizer) and tc.precision != "fp16"
    if tc.nonfinite_check == "device" and not able:
        why = ("the fp16 grad scaler already owns the optimizer's found_inf"
               if tc.precision == "fp16" else
               f"{type(optimizer).__name__} ({getattr(optimizer, 'lmlab_impl', '?')}) cannot skip "
               "an update on the device: only torch's fused AdamW and SGD can")
        raise UserError(f"nonfinite_check 'device': {why}; use 'auto' or 'host'",
                        field="train.nonfinite_check")
    if tc.nonfinite_check == "auto":
        return able and device.type == "cuda"
    return tc.nonfinite_check == "device"


def build_learner(cfg: RunConfig, vocab_size: int, device: torch.device) -> Learner:
    """Seed, build and place the model; its optimizer, grad scaler and EMA. Activation
    checkpointing and the data-parallel wrap are applied from outside the model; compiling is
    the caller's choice."""
    tc = cfg.train
    torch.manual_seed(tc.init_seed_used)
    model = build_run_model(cfg, vocab_size).to(device)
    apply_activation_checkpointing(model, tc.activation_checkpointing)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    # None unless this process is one of torchrun's ranks. Before the optimizer: FSDP replaces
    # the parameters with their shards.
    parallel = data_parallel(model, device, tc.distributed.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, model, device.type)
    return Learner(
        raw=model, optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16"), params=params,
        ema=[p.detach().clone() for p in params] if tc.ema_decay else None, train=tc,
        device=device, forward=model.hidden if parallel is None else parallel.forward,
        found_inf=torch.zeros((), device=device) if device_check(tc, device, optimizer) else None,
        parallel=parallel)


@dataclass
class StepOutput:
    loss: Tensor  # 0-dim, on the device: the step's cross-entropy (the reported train loss)
    grad_norm: Tensor  # 0-dim, on the device: global gradient norm before clipping
    # False: nothing was applied (the loop records the event and stops). None: the device-side
    # check, not read yet; ``bad`` is then its flag (1.0: non-finite, nothing applied).
    finite: bool | None
    seconds: float  # forward, backward and update; ``inspect`` is not timed
    inspected: dict[str, float]  # what ``inspect`` returned (probe gradient norms)
    bad: Tensor | None = None


def train_step(learner: Learner, micro_batches: Iterable[MicroBatch],
               inspect: Callable[[], dict[str, float]] | None = None) -> StepOutput:
    """Forward and backward over the step's micro-batches, then, if the loss and gradient norm
    are finite, clip and apply the update. ``inspect`` runs between the two, on the gradients as
    computed (before clipping), outside the timed part."""
    tc = learner.train
    t0 = time.perf_counter()
    loss = torch.zeros((), device=learner.device)
    for (x, y, weight), last in last_marked(micro_batches):  # type: ignore[misc]
        x = x.to(learner.device, non_blocking=True)
        y = y.to(learner.device, non_blocking=True)
        # Data parallel: the gradients are averaged over the ranks once, after the last one.
        accumulate = learner.parallel.accumulate() if learner.parallel is not None and not last \
            else contextlib.nullcontext()
        with accumulate:
            with learner.autocast():
                hidden = learner.forward(x)
                ce, objective = linear_cross_entropy(hidden.flatten(0, 1)[None],
                                                     learner.head[None], y.flatten()[None],
                                                     tc.label_smoothing, tc.z_loss)
            learner.scaler.scale(objective[0] * weight).backward()
        loss += ce[0].detach() * weight
    learner.scaler.unscale_(learner.optimizer)
    # The global norm before clipping (what clip_grad_norm_ computes and returns), kept on the
    # device; clipping reuses it once the step is known to be finite. Over the shards' norms
    # when the gradients are sharded (FSDP).
    grad_norm = whole(torch.nn.utils.get_total_norm(
        [p.grad for p in learner.params if p.grad is not None]))
    ok = finite_flag(learner, loss, grad_norm)
    if learner.parallel is not None:  # the global loss, and one verdict on finiteness for all
        loss, ok = learner.parallel.agree(loss, ok)
    finite = None if learner.device_check else bool(ok)  # the host check's one sync per step
    seconds = time.perf_counter() - t0
    inspected = inspect() if inspect is not None else {}
    t1 = time.perf_counter()
    bad = apply_update(learner, grad_norm, finite, ok)
    return StepOutput(loss, grad_norm, finite, seconds + time.perf_counter() - t1, inspected, bad)


def finite_flag(learner: Learner, loss: Tensor, grad_norm: Tensor) -> Tensor:
    """The step's finiteness, on the device. With fp16 the scaler skips steps with inf/NaN
    gradients by design; only the loss counts then."""
    ok = torch.isfinite(loss)
    return ok if learner.scaler.is_enabled() else ok & torch.isfinite(grad_norm)


def apply_update(learner: Learner, grad_norm: Tensor, finite: bool | None,
                 ok: Tensor) -> Tensor | None:
    """Clip, step, zero the gradients and move the EMA: unless ``finite`` is False (read on the
    host: nothing is applied), or, with ``finite`` None, on the device under the sticky flag of
    ``ok`` (see the module docstring). Returns the device flag of this step (1.0: non-finite)
    when checked on the device, else None."""
    tc, opt = learner.train, learner.optimizer
    bad = None
    if finite is None:
        assert learner.found_inf is not None, "a device-side check needs Learner.found_inf"
        bad = (~ok).float()
        torch.maximum(learner.found_inf, bad, out=learner.found_inf)
        opt.found_inf = learner.found_inf  # read by torch's fused kernels, which then skip
    elif not finite:
        opt.zero_grad(set_to_none=True)
        return None
    if tc.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(learner.params, tc.grad_clip, grad_norm)
    learner.scaler.step(opt)
    learner.scaler.update()
    opt.zero_grad(set_to_none=True)
    if learner.ema is not None:
        rate = 1 - tc.ema_decay
        if learner.found_inf is not None:  # no EMA move on a skipped step
            rate = (1 - learner.found_inf) * rate
        torch._foreach_lerp_(learner.ema, [p.detach() for p in learner.params],
                             rate if isinstance(rate, float) else [rate] * len(learner.ema))
    return bad


# -- a packed run's step ---------------------------------------------------------------------


@dataclass
class PackStepOutput:
    losses: Tensor  # [N] on the device: each member's cross-entropy
    grad_norms: Tensor  # [N]: each member's global gradient norm before clipping
    members: list[StepOutput]  # what a solo step would have returned, member by member


def pack_step(stack: StackedGPT, forward: Callable[[Tensor], Tensor], learners: list[Learner],
              micro_batches: Iterable[list[MicroBatch]],
              inspects: list[Callable[[], dict[str, float]] | None]) -> PackStepOutput:
    """One optimizer step of every member of a pack: one forward and backward through the
    stacked model (``forward``: ``stack.hidden`` or its compiled wrapper) and the fused loss of
    all members, then each member's own update through :func:`apply_update` (its own finiteness,
    clipping, optimizer, EMA). A non-finite member has nothing applied; the others go on.

    ``micro_batches`` yields, per micro-batch, one ``(x, y, weight)`` per member. Every member
    is charged the pack's time: its step took that long."""
    first = learners[0]
    t0 = time.perf_counter()
    losses = torch.zeros(len(learners), device=first.device)
    smoothing = [le.train.label_smoothing for le in learners]
    z_loss = [le.train.z_loss for le in learners]
    for micro in micro_batches:
        x = torch.stack([m[0] for m in micro]).to(first.device, non_blocking=True)
        y = torch.stack([m[1] for m in micro]).to(first.device, non_blocking=True)
        weight = micro[0][2]
        with first.autocast():
            hidden = forward(x)
            ce, objective = linear_cross_entropy(hidden.flatten(1, 2), stack.head, y.flatten(1),
                                                 smoothing, z_loss)
        (objective.sum() * weight).backward()
        losses += ce.detach() * weight
    stack.member_grads()
    grad_norms = stack.grad_norms()
    ok = torch.isfinite(losses) & torch.isfinite(grad_norms)
    # Members checked on the host are read in one sync for all; each member's optimizer decides.
    host = ok.tolist() if not all(le.device_check for le in learners) else None
    finite = [None if le.device_check or host is None else host[i]
              for i, le in enumerate(learners)]
    seconds = time.perf_counter() - t0
    inspected = [f() if f is not None else {} for f in inspects]
    t1 = time.perf_counter()
    bad = [apply_update(le, grad_norms[i], finite[i], ok[i]) for i, le in enumerate(learners)]
    stack.zero_grad()
    seconds += time.perf_counter() - t1
    members = [StepOutput(losses[i], grad_norms[i], finite[i], seconds, inspected[i], bad[i])
               for i in range(len(learners))]
    return PackStepOutput(losses, grad_norms, members)
