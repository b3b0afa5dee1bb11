"""One optimizer step, the same for the training loop, the Overfit Sanity preflight and the
plan's timing runs: the model and what updates it (a :class:`Learner`), and :func:`train_step`.

One deliberate host sync per step: the finiteness of the loss and the gradient norm is read
before the optimizer step, because a non-finite update must never be applied (it would corrupt
the weights the run's record describes). On CPU this costs nothing; on a GPU it is a one-byte
read. The loss and the gradient norm themselves stay on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import RunConfig, TrainConfig
from lmlab.errors import UserError
from lmlab.model import build_model, load_pretrained_gpt2
from lmlab.model.wrap import apply_activation_checkpointing
from lmlab.optim import build_optimizer

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


def loss_terms(logits: Tensor, targets: Tensor, label_smoothing: float,
               z_loss: float) -> tuple[Tensor, Tensor]:
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


@dataclass
class Learner:
    """The model and everything that updates it.

    ``raw`` is the eager model: checkpoints, optimizer groups, diagnostics and evaluation use it.
    ``forward`` is what the training step calls: ``raw``, or a compiled wrapper around it (set by
    the loop with :class:`lmlab.model.wrap.CompileFallback`).
    """

    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[Tensor]
    ema: list[Tensor] | None  # exponential moving average of the weights (train.ema_decay)
    train: TrainConfig
    device: torch.device
    forward: Callable[[Tensor], Tensor]

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

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            for e, v in zip(self.ema, state["ema"], strict=True):
                e.copy_(v)


def build_learner(cfg: RunConfig, vocab_size: int, device: torch.device) -> Learner:
    """Seed, build and place the model; its optimizer, grad scaler and EMA. Activation
    checkpointing is applied from outside the model; compiling is the caller's choice."""
    tc = cfg.train
    torch.manual_seed(tc.init_seed_used)
    model = build_run_model(cfg, vocab_size).to(device)
    apply_activation_checkpointing(model, tc.activation_checkpointing)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    params = [p for p in model.parameters() if p.requires_grad]
    return Learner(
        raw=model, optimizer=build_optimizer(cfg.optimizer, model, device.type),
        scaler=torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16"), params=params,
        ema=[p.detach().clone() for p in params] if tc.ema_decay else None, train=tc,
        device=device, forward=model)


@dataclass
class StepOutput:
    loss: Tensor  # 0-dim, on the device: the step's cross-entropy (the reported train loss)
    grad_norm: Tensor  # 0-dim, on the device: global gradient norm before clipping
    finite: bool  # False: nothing was applied (the loop records the event and stops)
    seconds: float  # forward, backward and update; ``inspect`` is not timed
    inspected: dict[str, float]  # what ``inspect`` returned (probe gradient norms)


def train_step(learner: Learner, micro_batches: Iterable[MicroBatch],
               inspect: Callable[[], dict[str, float]] | None = None) -> StepOutput:
    """Forward and backward over the step's micro-batches, then, if the loss and gradient norm
    are finite, clip and apply the update. ``inspect`` runs between the two, on the gradients as
    computed (before clipping), outside the timed part."""
    tc = learner.train
    t0 = time.perf_counter()
    loss = torch.zeros((), device=learner.device)
    for x, y, weight in micro_batches:
        x = x.to(learner.device, non_blocking=True)
        y = y.to(learner.device, non_blocking=True)
        with learner.autocast():
            logits = learner.forward(x)
        ce, objective = loss_terms(logits, y, tc.label_smoothing, tc.z_loss)
        learner.scaler.scale(objective * weight).backward()
        loss += ce.detach() * weight
    learner.scaler.unscale_(learner.optimizer)
    # The global norm before clipping (what clip_grad_norm_ computes and returns), kept on the
    # device; clipping reuses it once the step is known to be finite.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in learner.params if p.grad is not None])
    # With fp16 the scaler skips steps with inf/NaN gradients by design; only the loss counts.
    finite_t = torch.isfinite(loss)
    if not learner.scaler.is_enabled():
        finite_t = finite_t & torch.isfinite(grad_norm)
    finite = bool(finite_t)  # the one per-step host sync (see the module docstring)
    seconds = time.perf_counter() - t0
    inspected = inspect() if inspect is not None else {}
    if not finite:
        learner.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, False, seconds, inspected)
    t1 = time.perf_counter()
    if tc.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(learner.params, tc.grad_clip, grad_norm)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.ema is not None:
        torch._foreach_lerp_(learner.ema, [p.detach() for p in learner.params], 1 - tc.ema_decay)
    return StepOutput(loss, grad_norm, True, seconds + time.perf_counter() - t1, inspected)
