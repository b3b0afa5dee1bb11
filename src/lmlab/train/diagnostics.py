"""Stability detectors and the optional diagnostics of template section 6.

Stability (always on): the loss-spike detector and the divergence check, fed with the per-step
losses once per log interval. Diagnostics (cadence ``DiagnosticsConfig.every_steps``):

- gradient norms per block, per parameter kind and for every norm-layer weight/bias, read from the
  gradients the training step already computed (no extra backward);
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

from lmlab.config import DiagnosticsConfig
from lmlab.model.attention import CausalSelfAttention, attention_entropy
from lmlab.optim import classify_params


@dataclass
class SpikeDetector:
    """A loss is a spike when it exceeds the mean of the previous ``window`` losses by
    ``threshold`` standard deviations, after ``warmup`` steps (cf. Lightning's SpikeDetection and
    llm-foundry's kill-loss-spike). Spikes are kept out of the window so one spike does not
    widen the band and hide the next."""

    window: int = 50
    warmup: int = 50
    threshold: float = 6.0
    history: deque[float] = field(default_factory=deque)
    seen: int = 0

    def update(self, step: int, loss: float) -> dict | None:
        self.seen += 1
        spike = None
        if self.seen > self.warmup and len(self.history) >= min(self.window, 5) and math.isfinite(loss):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(n - 1, 1))
            # A floor on the spread: a perfectly flat history must not turn noise into spikes.
            std = max(std, 1e-3 * abs(mean), 1e-6)
            z = (loss - mean) / std
            if z > self.threshold:
                spike = {"step": step, "loss": loss, "mean": mean, "std": std, "z": z,
                         "magnitude": loss - mean}
        if spike is None and math.isfinite(loss):
            self.history.append(loss)
            while len(self.history) > self.window:
                self.history.popleft()
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"])
        self.seen = state["seen"]

    @classmethod
    def from_config(cls, cfg: DiagnosticsConfig) -> SpikeDetector:
        return cls(window=cfg.spike_window, warmup=cfg.spike_warmup, threshold=cfg.spike_threshold)


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors])
    ).item()


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


class Diagnostics:
    """Computes the optional diagnostics for one model; every method returns {metric: value}."""

    def __init__(self, cfg: DiagnosticsConfig, model: nn.Module, probe_x: torch.Tensor) -> None:
        self.cfg = cfg
        self.model = model
        self.probe_x = probe_x
        self.kinds = classify_params(model)
        self.params = dict(model.named_parameters())
        self.n_layer = len(model.blocks)  # type: ignore[arg-type]

    def due(self, step: int) -> bool:
        return self.cfg.any_probe and step % self.cfg.every_steps == 0

    # -- gradients of the step just computed ---------------------------------------------------
    def grad_norms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        if self.cfg.layer_grad_norms:
            for i in range(self.n_layer):
                out[f"grad_norm/block.{i}"] = _norm([g for n, g in grads.items() if _block_of(n) == i])
            for kind in sorted(set(self.kinds.values())):
                out[f"grad_norm/kind.{kind}"] = _norm(
                    [g for n, g in grads.items() if self.kinds.get(n) == kind])
        if self.cfg.norm_grad_norms:
            for n, g in grads.items():
                if self.kinds.get(n) == "norm" or (self.kinds.get(n) == "bias" and "norm" in n):
                    out[f"norm_grad_norm/{n}"] = _norm([g])
        return out

    # -- update / weight ratio -----------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor] | None:
        if not self.cfg.update_ratio:
            return None
        return {n: p.detach().clone() for n, p in self.params.items() if p.ndim >= 2}

    def update_ratios(self, before: dict[str, torch.Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(self.n_layer):
            names = [n for n in before if _block_of(n) == i]
            delta = _norm([self.params[n].detach() - before[n] for n in names])
            weight = _norm([before[n] for n in names])
            out[f"update_ratio/block.{i}"] = delta / weight if weight > 0 else 0.0
        return out

    # -- probe batch: activations and attention entropy -----------------------------------------
    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        if not (self.cfg.activation_norms or self.cfg.attention_entropy):
            return {}
        model = self.model
        blocks = model.blocks  # type: ignore[attr-defined]
        watch = sorted({0, self.n_layer // 2, self.n_layer - 1})
        acts: dict[int, float] = {}
        hooks = []
        if self.cfg.activation_norms:
            for i in watch:
                def hook(_m, _inp, output, i=i):
                    acts[i] = output.detach().float().pow(2).mean().sqrt().item()
                hooks.append(blocks[i].register_forward_hook(hook))
        attns = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
        for a in attns:
            a.capture_probs = self.cfg.attention_entropy
        was_training = model.training
        model.eval()  # no dropout: the probe draws no random numbers from the training stream
        try:
            model(self.probe_x)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
            for a in attns:
                a.capture_probs = False
        out: dict[str, float] = {}
        for i in watch:  # first, middle and last block
            if i in acts:
                out[f"act_rms/block.{i}"] = acts[i]
        if self.cfg.attention_entropy:
            for layer, a in enumerate(attns):
                ent = attention_entropy(a.last_probs.float())  # (B, H, T)
                a.last_probs = None
                out[f"attn_entropy/layer.{layer}"] = ent.mean().item()
                for h, v in enumerate(ent.mean(dim=(0, 2)).tolist()):
                    out[f"attn_entropy/layer.{layer}.head.{h}"] = v
        return out
