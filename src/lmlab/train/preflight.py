"""The Overfit Sanity preflight: can this configuration memorise a tiny fixed slice?

A model, optimizer and precision setting that cannot drive the loss on a handful of sequences
towards zero has a bug (or a broken setting such as lr = 0) that a long sweep would only hide.
The preflight uses the same model, optimizer, loss and precision code as the training loop, on
the first ``sequences`` training windows in a fixed order, with a constant learning rate and with
dropout and weight decay off (regularisation fights memorisation; the check is about the
optimisation path). Pass: final loss below the threshold, no NaN, every gradient finite.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lmlab.config import RunConfig
from lmlab.data.tokenize import DataBundle
from lmlab.errors import UserError
from lmlab.model.wrap import apply_activation_checkpointing
from lmlab.optim import build_optimizer
from lmlab.train.loop import autocast_context, build_run_model, loss_terms, resolve_device


@dataclass
class PreflightResult:
    key: str
    arms: list[str]
    passed: bool
    initial_loss: float
    final_loss: float
    threshold: float
    steps: int
    batch_size: int
    sequences: int
    seq_len: int
    lr: float
    nan: bool
    grads_finite: bool
    losses: list[float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def preflight_config(cfg: RunConfig, lr: float | None = None,
                     seq_len: int | None = None) -> RunConfig:
    """The arm's config as the preflight trains it: no dropout, no weight decay, constant lr."""
    tree = cfg.model_dump()
    if seq_len is not None:
        tree["train"]["seq_len"] = seq_len
    tree["model"]["dropout"] = 0.0
    tree["optimizer"]["weight_decay"] = 0.0
    if lr is not None:
        tree["optimizer"]["lr"] = lr
    tree["schedule"] = {"name": "constant"}
    tree["train"]["seed"] = 0
    return RunConfig.model_validate(tree)


def preflight_key(cfg: RunConfig) -> str:
    """Arms that share a model / memory / optimizer configuration share one preflight."""
    return cfg.model_copy(update={"budget": RunConfig().budget, "eval": RunConfig().eval,
                                  "diagnostics": RunConfig().diagnostics}).config_hash


def overfit(cfg: RunConfig, data: DataBundle, *, sequences: int, batch_size: int, steps: int,
            loss_threshold: float, key: str = "", arms: list[str] | None = None) -> PreflightResult:
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = build_run_model(cfg, data.tokenizer.vocab_size).to(device)  # init_from too
    apply_activation_checkpointing(model, tc.activation_checkpointing)
    optimizer = build_optimizer(cfg.optimizer, model, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    train = data.splits["train"]
    need = sequences * tc.seq_len + 1
    if len(train) < need:
        raise UserError(f"the train split has {len(train)} tokens, fewer than the preflight's "
                        f"slice of {sequences} x {tc.seq_len} + 1", field="preflight.sequences")
    window = torch.from_numpy(train[:need].astype("int64"))
    xs = window[:-1].view(sequences, tc.seq_len)
    ys = window[1:].view(sequences, tc.seq_len)

    losses: list[float] = []
    nan = False
    grads_finite = True
    for step in range(steps):
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % sequences
        x, y = xs[idx].to(device), ys[idx].to(device)
        with autocast_context(device, tc.precision):
            logits = model(x)
        ce, objective = loss_terms(logits, y, 0.0, 0.0)
        scaler.scale(objective).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
        loss = ce.item()
        losses.append(loss)
        if not math.isfinite(loss):
            nan = True
            break
        if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16 overflow is the scaler's job
            grads_finite = False
            break
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    final = losses[-1]
    return PreflightResult(
        key=key, arms=arms or [], passed=(not nan and grads_finite and final < loss_threshold),
        initial_loss=losses[0], final_loss=final, threshold=loss_threshold, steps=len(losses),
        batch_size=batch_size, sequences=sequences, seq_len=tc.seq_len, lr=cfg.optimizer.lr,
        nan=nan, grads_finite=grads_finite, losses=losses)
