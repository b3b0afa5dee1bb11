"""Stability detectors and the optional diagnostics of template section 6.

Stability (always on): the loss-spike detector and the divergence check, fed with the per-step
losses once per log interval. Diagnostics (cadence ``DiagnosticsConfig.every_steps``):

- gradient norms per block, per parameter kind and for every norm-layer weight/bias, read from the
  gradients the training step already computed (no extra backward), before clipping, like the
  global gradient norm the loop logs every step;
- the update/weight ratio per block, from a parameter snapshot taken just before the step;
- activation RMS of the residual stream after the first, middle and last block, and attention
  entropy per layer and head, from a forward pass on a fixed probe batch in eval mode under
  ``no_grad``: it runs outside the timed step, draws no random numbers (eval mode has no dropout)
  and touches no gradient, so the training curve is bit-identical with and without it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmlab.config import DiagnosticsConfig
from lmlab.model.attention import CausalSelfAttention, attention_entropy
from lmlab.names import (
    DIAG_ACT_RMS,
    DIAG_ATTN_ENTROPY,
    DIAG_BLOCK_GRAD,
    DIAG_KIND_GRAD,
    DIAG_NORM_GRAD,
    DIAG_UPDATE_RATIO,
)
from lmlab.optim import classify_params
from lmlab.train.distributed import local, sum_over_shards


@dataclass
class SpikeDetector:
    """A loss is a spike when it exceeds the mean of the previous ``window`` losses by
    ``threshold`` standard deviations, after ``warmup`` steps (cf. Lightning's SpikeDetection and
    llm-foundry's kill-loss-spike). Spikes are kept out of the window so one spike does not
    widen the band and hide the next. A loss that stays up for ``patience`` steps in a row is a new
    level rather than a run of spikes: those losses become the window and detection goes on from
    there, so a lasting jump gives ``patience`` spike events, not one per remaining step.
    Non-finite losses are never spikes (the loop stops on them) and never enter the window."""

    window: int = 50
    warmup: int = 50
    threshold: float = 6.0
    patience: int = 5
    history: deque[float] = field(default_factory=deque)
    seen: int = 0
    streak: list[float] = field(default_factory=list)  # consecutive spikes so far

    def update(self, step: int, loss: float) -> dict | None:
        """Feed one step's loss; returns the spike event's detail when ``loss`` is a spike."""
        self.seen += 1
        if not math.isfinite(loss):
            return None
        spike = None
        if self.seen > self.warmup and len(self.history) >= min(self.window, 5):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(n - 1, 1))
            # A floor on the spread: a perfectly flat history must not turn noise into spikes.
            std = max(std, 1e-3 * abs(mean), 1e-6)
            z = (loss - mean) / std
            if z > self.threshold:
                spike = {"step": step, "loss": loss, "mean": mean, "std": std, "z": z,
                         "magnitude": loss - mean}
        if spike is None:
            self.streak.clear()
            self._remember(loss)
        else:
            self.streak.append(loss)
            if len(self.streak) >= self.patience:  # a new level: start the window from it
                self.history.clear()
                for x in self.streak:
                    self._remember(x)
                self.streak.clear()
        return spike

    def _remember(self, loss: float) -> None:
        self.history.append(loss)
        while len(self.history) > self.window:
            self.history.popleft()

    def state_dict(self) -> dict:
        return {"history": list(self.history), "seen": self.seen, "streak": list(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"])
        self.seen = state["seen"]
        self.streak = list(state.get("streak", []))

    @classmethod
    def from_config(cls, cfg: DiagnosticsConfig) -> SpikeDetector:
        return cls(window=cfg.spike_window, warmup=cfg.spike_warmup, threshold=cfg.spike_threshold)


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm in fp32, left on the tensor's device: of this rank's shard when ``t`` is
    sharded (FSDP), to be summed over the ranks (``sum_over_shards``)."""
    return torch.linalg.vector_norm(local(t.detach()), dtype=torch.float32).square()


def _read(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: 0-dim tensor} -> {name: float} in one device read."""
    if not values:
        return {}
    return dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))


class Diagnostics:
    """Computes the optional diagnostics for one model; every method returns {metric: value}.

    Metric names (one store row each, at the step just taken):

    - ``grad_norm/block.{i}``, ``grad_norm/kind.{kind}``: L2 norm of the gradients of block i,
      and of every parameter of one kind (embedding, head, norm, bias, matrix), before clipping;
    - ``norm_grad_norm/{parameter}``: each LayerNorm/RMSNorm weight and bias gradient;
    - ``update_ratio/block.{i}``: ||W_after - W_before|| / ||W_before|| over block i's matrices;
    - ``act_rms/block.{i}``: RMS of the residual stream after blocks first, middle and last;
    - ``attn_entropy/layer.{i}`` (mean over heads, positions and probe sequences) and
      ``attn_entropy/layer.{i}.head.{h}``, in nats.

    Each method reads the device once, so a probe costs a handful of syncs, never one per tensor.
    """

    def __init__(self, cfg: DiagnosticsConfig, model: nn.Module, probe_x: torch.Tensor) -> None:
        self.cfg = cfg
        self.model = model
        self.probe_x = probe_x
        self.kinds = classify_params(model)
        self.params = dict(model.named_parameters())
        # FSDP: every weight is sharded over the ranks, and a norm is summed over the shards
        # (every rank probes at the same steps, so the all-reduces pair up).
        self.sharded = any(isinstance(p, DTensor) for p in self.params.values())
        self.n_layer = len(model.blocks)  # type: ignore[arg-type]
        self.blocks: dict[int, list[str]] = {i: [] for i in range(self.n_layer)}
        for name in self.params:
            block = _block_of(name)
            if block is not None:
                self.blocks[block].append(name)
        self.by_kind: dict[str, list[str]] = {}
        for name, kind in self.kinds.items():
            self.by_kind.setdefault(kind, []).append(name)
        self.norm_params = [n for n, k in self.kinds.items()
                            if k == "norm" or (k == "bias" and "norm" in n)]

    def due(self, step: int) -> bool:
        return self.cfg.any_probe and step % self.cfg.every_steps == 0

    # -- gradients of the step just computed ---------------------------------------------------
    def grad_norms(self) -> dict[str, float]:
        """Norms of the gradients as they stand (the loop calls this before clipping)."""
        if not (self.cfg.layer_grad_norms or self.cfg.norm_grad_norms):
            return {}
        sq = sum_over_shards({n: _sq_norm(p.grad) for n, p in self.params.items()
                              if p.grad is not None}, self.sharded)
        if not sq:
            return {}
        zero = torch.zeros((), device=next(iter(sq.values())).device)

        def group(names: list[str]) -> torch.Tensor:
            return sum((sq[n] for n in names if n in sq), zero).sqrt()

        out: dict[str, torch.Tensor] = {}
        if self.cfg.layer_grad_norms:
            for i, names in self.blocks.items():
                out[f"{DIAG_BLOCK_GRAD}{i}"] = group(names)
            for kind in sorted(self.by_kind):
                out[f"{DIAG_KIND_GRAD}{kind}"] = group(self.by_kind[kind])
        if self.cfg.norm_grad_norms:
            for n in self.norm_params:
                if n in sq:
                    out[f"{DIAG_NORM_GRAD}{n}"] = sq[n].sqrt()
        return _read(out)

    # -- update / weight ratio -----------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor] | None:
        """The blocks' weight matrices just before the optimizer step (None when not needed)."""
        if not self.cfg.update_ratio:
            return None
        return {n: self.params[n].detach().clone() for names in self.blocks.values()
                for n in names if self.params[n].ndim >= 2}

    def update_ratios(self, before: dict[str, torch.Tensor]) -> dict[str, float]:
        sq: dict[str, torch.Tensor] = {}
        for i, names in self.blocks.items():
            names = [n for n in names if n in before]
            if names:
                sq[f"delta.{i}"] = sum(_sq_norm(self.params[n].detach() - before[n])
                                       for n in names)  # type: ignore[assignment]
                sq[f"weight.{i}"] = sum(_sq_norm(before[n]) for n in names)  # type: ignore[assignment]
        sq = sum_over_shards(sq, self.sharded)
        out: dict[str, torch.Tensor] = {}
        for i in self.blocks:
            if f"delta.{i}" in sq:
                d, w = sq[f"delta.{i}"].sqrt(), sq[f"weight.{i}"].sqrt()
                out[f"{DIAG_UPDATE_RATIO}{i}"] = torch.where(w > 0, d / w, torch.zeros_like(d))
        return _read(out)

    # -- probe batch: activations and attention entropy -----------------------------------------
    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        """One forward pass on the fixed probe batch, in eval mode and full precision: draws no
        random numbers, builds no graph and leaves every gradient as it was."""
        if not (self.cfg.activation_norms or self.cfg.attention_entropy):
            return {}
        model = self.model
        blocks = model.blocks  # type: ignore[attr-defined]
        watch = sorted({0, self.n_layer // 2, self.n_layer - 1})  # first, middle, last block
        out: dict[str, torch.Tensor] = {}
        hooks = []
        if self.cfg.activation_norms:
            for i in watch:
                def hook(_m: nn.Module, _inp: object, output: torch.Tensor, i: int = i) -> None:
                    out[f"{DIAG_ACT_RMS}{i}"] = output.detach().float().square().mean().sqrt()
                hooks.append(blocks[i].register_forward_hook(hook))
        attns = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
        if self.cfg.attention_entropy:
            for layer, a in enumerate(attns):
                def entropy(m: CausalSelfAttention, _inp: object, _out: object,
                            layer: int = layer) -> None:
                    # Reduced as soon as the layer has run: one layer's B x H x T x T
                    # probabilities alive at a time, however deep the model.
                    assert m.last_probs is not None
                    ent = attention_entropy(m.last_probs)  # (B, H, T)
                    m.last_probs = None
                    out[f"{DIAG_ATTN_ENTROPY}{layer}"] = ent.mean()
                    for h, v in enumerate(ent.mean(dim=(0, 2)).unbind()):
                        out[f"{DIAG_ATTN_ENTROPY}{layer}.head.{h}"] = v
                a.capture_probs = True
                hooks.append(a.register_forward_hook(entropy))
        modes = {m: m.training for m in model.modules()}
        model.eval()  # no dropout: the probe draws no random numbers from the training stream
        try:
            model(self.probe_x)
        finally:
            for m, training in modes.items():
                m.training = training
            for h in hooks:
                h.remove()
            for a in attns:
                a.capture_probs = False
                a.last_probs = None
        return _read(out)
