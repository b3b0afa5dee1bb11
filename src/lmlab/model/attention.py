"""Causal self-attention, rotary position embeddings and the attention-entropy probe.

Two implementations of the same maths: ``sdpa`` (PyTorch's fused kernels, the fast default) and
``manual`` (the softmax written out, as in nanoGPT). The manual path is also how the diagnostics
see attention probabilities, which the fused kernels never materialise.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SdpaBackend = Literal["auto", "flash", "efficient", "math"]

_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021), in the rotate-half layout of GPT-NeoX and Llama:
# the head dimension is split in two halves that form the (real, imaginary) parts of the pairs.


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, computed once.

    The tables are non-persistent buffers: they follow ``.to(device)`` but stay out of the state
    dict, so checkpoints hold only learned weights and a rope model's keys don't depend on the
    sequence length it was built for.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Computed in float64 and stored in float32: the angles of far positions are large
        # numbers whose cos/sin lose digits if the product itself is formed in float32.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [seq_len, head_dim/2]."""
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x[i], x[i + d/2]) pair of ``x`` [..., T, d] by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused qkv projection, one output projection."""

    def __init__(self, d_model: int, n_head: int, *, max_seq_len: int, bias: bool = True,
                 dropout: float = 0.0, rope: bool = False, rope_theta: float = 10000.0,
                 impl: Literal["sdpa", "manual"] = "sdpa", sdpa_backend: SdpaBackend = "auto",
                 ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.impl = impl
        self.sdpa_backend = sdpa_backend
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta) if rope else None
        # Set by the diagnostics around a probe forward (under no_grad): routes through the
        # manual path and keeps the softmax output in ``last_probs`` (B×H×T×T, fp32, detached).
        self.capture_probs: bool = False
        self.last_probs: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, H, T, head_dim]
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(T)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.impl == "manual" or self.capture_probs:
            y = self._manual(q, k, v)
        else:
            y = self._sdpa(q, k, v)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # A pinned backend is a CUDA notion; on CPU PyTorch has one kernel family and would
        # refuse e.g. FLASH_ATTENTION outright, so the pin only applies to CUDA tensors.
        pin = (sdpa_kernel(_BACKENDS[self.sdpa_backend])
               if self.sdpa_backend != "auto" and q.is_cuda else contextlib.nullcontext())
        with pin:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)

    def _manual(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        probs = causal_probs(q, k)
        if self.capture_probs:
            self.last_probs = probs.detach()
        return self.attn_dropout(probs.to(v.dtype)) @ v


def causal_probs(q: Tensor, k: Tensor) -> Tensor:
    """Causal attention probabilities [..., T, T] of queries and keys [..., T, head_dim], the
    softmax in fp32 whatever the autocast dtype, as the fused kernels do internally."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    return F.softmax(att.float(), dim=-1)


def attention_entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of each attention distribution (the last dimension), with 0·log 0 = 0.

    For B×H×T×T probabilities this is B×H×T: one value per (batch, head, query position). A
    causal query at position i can spread over at most i+1 keys, so its entropy lies in
    [0, log(i+1)]; collapse towards 0 is the attention-entropy instability of Zhai et al. 2023.
    """
    return torch.special.entr(probs.float()).sum(dim=-1)
