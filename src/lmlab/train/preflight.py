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
from lmlab.identity import digest
from lmlab.optim import set_lr
from lmlab.train.step import build_learner, resolve_device, train_step


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
    """The arm's config as the preflight trains it: no dropout, no weight decay, no label
    smoothing, z-loss or EMA, a constant lr, seed 0."""
    tree = cfg.model_dump()
    if seq_len is not None:
        tree["train"]["seq_len"] = seq_len
    tree["model"]["dropout"] = 0.0
    tree["optimizer"]["weight_decay"] = 0.0
    if lr is not None:
        tree["optimizer"]["lr"] = lr
    tree["schedule"] = {"name": "constant"}
    # Every step's loss is read anyway, so the host checks finiteness (a skipped step must
    # end the check, not pass unseen).
    tree["train"].update(seed=0, init_seed=None, data_seed=None, label_smoothing=0.0, z_loss=0.0,
                         ema_decay=None, nonfinite_check="host")
    return RunConfig.model_validate(tree)


def preflight_key(cfg: RunConfig) -> str:
    """Configurations that share a model / memory / optimizer setting share one preflight."""
    return digest(cfg, "preflight")


def overfit(cfg: RunConfig, data: DataBundle, *, sequences: int, batch_size: int, steps: int,
            loss_threshold: float, key: str = "", arms: list[str] | None = None) -> PreflightResult:
    """Train ``cfg`` (a :func:`preflight_config`) on the first ``sequences`` training windows,
    ``batch_size`` at a time in a fixed order, with the training loop's own step."""
    tc = cfg.train
    learner = build_learner(cfg, data.tokenizer.vocab_size, resolve_device(tc.device))
    set_lr(learner.optimizer, 1.0)
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
        out = train_step(learner, [(xs[idx], ys[idx], 1.0)])
        losses.append(out.loss.item())
        if not out.finite:
            nan = not math.isfinite(losses[-1])
            grads_finite = nan or bool(torch.isfinite(out.grad_norm))
            break
    final = losses[-1]
    return PreflightResult(
        key=key, arms=arms or [], passed=(not nan and grads_finite and final < loss_threshold),
        initial_loss=losses[0], final_loss=final, threshold=loss_threshold, steps=len(losses),
        batch_size=batch_size, sequences=sequences, seq_len=tc.seq_len, lr=cfg.optimizer.lr,
        nan=nan, grads_finite=grads_finite, losses=losses)
