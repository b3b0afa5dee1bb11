"""The training loss, fused with the output projection.

``linear_cross_entropy`` takes the final hidden states and the head's weight instead of the
logits. It goes through the tokens a chunk at a time: the chunk's logits, their log-normaliser,
the loss terms and, since the gradient of a softmax cross-entropy is known in closed form
(``softmax - onehot``), the chunk's gradients with respect to the hidden states and the head,
all while the chunk's logits are in cache. The ``[tokens, vocab]`` logits, their log-softmax and
their gradient, the largest tensors of a small model's step, are never held at once (the idea
of Liger Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, written in plain
PyTorch ops). The backward pass only scales the stored gradients.

What it returns is what the training loop reports and minimises: plain cross-entropy (the
reported train loss, the same number whatever the label smoothing or z-loss, so arms that differ
in them are compared on one quantity) and the objective

    (1 - ε)·CE + ε·mean_t(lse_t - mean_v z_tv) + λ·mean_t(lse_t²)

with ε the label smoothing and λ the z-loss weight (PaLM). Its gradient with respect to the
logits of token t is ``p_t·(1 + 2λ·lse_t) - (1 - ε)·onehot(y_t) - ε/V``, divided by the token
count.

Members: every tensor has a leading member dimension N (1 for a solo run), and each member has
its own label smoothing and z-loss; ``lmlab.train.pack`` computes a whole pack in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# Logit elements per chunk: 2M floats (8 MiB in fp32) stay in a CPU core's cache hierarchy and
# keep a GPU's matmuls large; at GPT-2's vocabulary that is ~40 tokens, at 8192 it is 256.
CHUNK_ELEMENTS = 2**21


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (bf16/fp16 logits, as nn.Linear would give
    under autocast), else the inputs' own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor,
                smoothing: tuple[float, ...], z_loss: tuple[float, ...],
                ) -> tuple[Tensor, Tensor]:
        n, m, _ = hidden.shape
        vocab = weight.shape[1]
        dtype = _compute_dtype(hidden.device, hidden.dtype)
        # Logits, losses and the head's gradient in fp32 at least (fp64 stays fp64: the tests).
        acc = torch.promote_types(dtype, torch.float32)
        rows = max(1, min(m, CHUNK_ELEMENTS // vocab))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ce = torch.zeros(n, dtype=acc, device=hidden.device)
        objective = torch.zeros(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(n):
                w = weight[i].to(dtype)
                eps, lam = smoothing[i], z_loss[i]
                for start in range(0, m, rows):
                    h = hidden[i, start:start + rows].to(dtype)
                    y = targets[i, start:start + rows]
                    logits = (h @ w.t()).to(acc)
                    lse = torch.logsumexp(logits, dim=-1)
                    nll = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                    ce[i] += nll
                    obj = (1 - eps) * nll
                    if eps > 0:
                        obj = obj + eps * (lse - logits.mean(dim=-1)).sum()
                    if lam > 0:
                        obj = obj + lam * lse.square().sum()
                    objective[i] += obj
                    # The gradient with respect to these logits, in their own storage.
                    grad = logits.sub_(lse[:, None]).exp_()
                    if lam > 0:
                        grad.mul_((1 + 2 * lam * lse)[:, None])
                    grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), -(1 - eps)))
                    if eps > 0:
                        grad.sub_(eps / vocab)
                    grad = grad.div_(m).to(dtype)
                    grad_hidden[i, start:start + rows] = grad @ w
                    grad_weight[i].add_((grad.t() @ h).to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return ce / m, objective / m

    @staticmethod
    def backward(ctx: Any, _grad_ce: Tensor | None, grad_objective: Tensor,
                 ) -> tuple[Tensor, Tensor, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_objective.view(-1, 1, 1)
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), \
            None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         label_smoothing: Sequence[float] | float = 0.0,
                         z_loss: Sequence[float] | float = 0.0) -> tuple[Tensor, Tensor]:
    """Per member: (mean cross-entropy as reported, mean objective that is minimised), each [N].

    ``hidden`` [N, tokens, d_model], ``weight`` [N, vocab, d_model] (the head, e.g. a tied
    embedding), ``targets`` [N, tokens]; ``label_smoothing`` and ``z_loss`` per member (a float
    applies to all). Only the objective carries a gradient.
    """
    n = hidden.shape[0]
    smoothing = tuple(label_smoothing) if isinstance(label_smoothing, Sequence) \
        else (float(label_smoothing),) * n
    lam = tuple(z_loss) if isinstance(z_loss, Sequence) else (float(z_loss),) * n
    if len(smoothing) != n or len(lam) != n:
        raise ValueError(f"{n} members but {len(smoothing)} label smoothings, {len(lam)} z-losses")
    return _LinearCrossEntropy.apply(hidden, weight, targets, smoothing, lam)
