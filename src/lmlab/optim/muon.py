"""Muon: MomentUm Orthogonalized by Newton–Schulz (Keller Jordan et al., 2024).

Muon runs SGD with momentum on each hidden weight matrix and replaces the momentum-updated
gradient by (approximately) its nearest semi-orthogonal matrix before applying it, so every
update has all its singular values near one. Embeddings, the output head, norm gains and biases
are not hidden matrices: they are trained with AdamW inside the same optimizer, so the training
loop, checkpointing and lr schedules see a single ``torch.optim.Optimizer``.

References: https://kellerjordan.github.io/posts/muon/ and github.com/KellerJordan/Muon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# Quintic coefficients chosen to maximise the slope at zero (so small singular values grow fast)
# at the price of not converging exactly to 1: after 5 steps the singular values of a
# well-conditioned input land in roughly [0.68, 1.13], which the reference shows is as good as an
# exact orthogonalisation for training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximate U Vᵀ (for G = U S Vᵀ) with ``steps`` quintic Newton–Schulz iterations.

    Works on the last two dimensions (so a batch of matrices is fine) and returns G's dtype.
    On CUDA the iteration runs in bfloat16, which is stable for it and much faster; elsewhere in
    float32, since CPU bfloat16 matmuls are slow and buy nothing.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    # Iterate on the wide orientation so X @ Xᵀ is the smaller Gram matrix.
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so after this every singular value is <= 1 and
    # inside the iteration's basin of convergence.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True`` (parameters of 2 or more dimensions), AdamW for the
    groups with ``use_muon=False``.

    Muon groups use ``lr``, ``momentum``, ``nesterov``, ``ns_steps`` and ``weight_decay``; AdamW
    groups use ``lr``, ``betas``, ``eps`` and ``weight_decay``. Weight decay is decoupled in both
    (θ ← θ·(1 − lr·wd)), as in AdamW. Any of these may be set per group; the constructor
    arguments are the defaults.

    ``lr`` of a Muon group is in units of spectral norm per step: the orthogonalised update has
    singular values near 1, scaled by sqrt(max(1, rows/cols)) so that tall matrices (which
    receive a rank-limited update) are not under-trained.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_muon: bool = True,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, weight_decay=weight_decay, use_muon=use_muon)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"Muon groups take matrices; got a parameter of shape "
                                         f"{tuple(p.shape)} (put it in a use_muon=False group)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            # EMA form of momentum (buf = β·buf + (1−β)·g). Its scale differs from SGD's running
            # sum, but the orthogonalisation below normalises the scale away.
            buf.lerp_(p.grad, 1 - beta)
            # Nesterov: step along the gradient blended with the updated buffer. Out of place, so
            # p.grad is left as the loss produced it (diagnostics read it after the step).
            update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
            # Conv-style weights (out, in, kh, kw) are orthogonalised as (out, in·kh·kw).
            matrix = update.reshape(update.size(0), -1)
            ortho = newton_schulz(matrix, group["ns_steps"])
            ortho *= math.sqrt(max(1.0, matrix.size(0) / matrix.size(1)))
            p.mul_(1 - lr * wd)
            p.add_(ortho.view_as(p), alpha=-lr)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if not state:
                # A plain int: kept as is by state_dict/load_state_dict and not counted as
                # tensor memory.
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # Same arithmetic as torch.optim.AdamW: bias corrections folded into the step size
            # and into the denominator, eps added after the square root.
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
