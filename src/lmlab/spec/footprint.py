"""What a run needs in memory, from its config alone: nothing is built or allocated.

Parameters come from the model's shapes (every architecture knob: width, depth, MLP width and
activation, bias, tied embeddings, norm kind and position, learned or rotary positions), the
optimizer state from how each optimizer keeps it (AdamW two moments, Muon a momentum on matrices
and AdamW's moments elsewhere, Adafactor factored rows and columns, ...), and the activations
from what autograd keeps for the backward pass of one micro-batch (per block, after Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", counted for this
model's own ops), plus what the fused head and loss (``lmlab.train.loss``) keep: the gradients
with respect to the hidden states and the head, computed in the forward pass (the ``[tokens,
vocab]`` logits are never held whole).

The total is a lower bound of the peak: the allocator's fragmentation, temporary buffers, the
CUDA context and the Python process itself come on top. So a config whose estimate is already
more than the machine or ``budget.max_memory_mb`` allows can never run, and is refused before
anything starts; one that fits the estimate may still run out, which the run records as
``over_budget``. ``tests/test_footprint.py`` holds the shapes to real models' and the
activation count to what autograd saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from lmlab.config import ModelConfig, RunConfig

FP32 = 4


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embedding" | "head" | "norm" | "bias" | "matrix", as the optimizer groups them

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Layout:
    """The model's parameters: those outside the blocks, and one block's (the same in each)."""

    outside: list[Param]
    block: list[Param]  # named blocks.{i}.*
    n_layer: int

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.outside) + self.n_layer * sum(p.numel for p in self.block)


def layout(cfg: ModelConfig, vocab_size: int, seq_len: int) -> Layout:
    """The model's parameters as ``lmlab.model.GPT`` names them (a tied head once, as the token
    embedding), with shape and kind. Counted per block, so any depth costs the same to count."""
    d, f = cfg.d_model, cfg.mlp_width

    def norm(name: str) -> list[Param]:
        params = [Param(f"{name}.weight", (d,), "norm")]
        if cfg.norm == "layernorm" and cfg.bias:  # RMSNorm has no bias
            params.append(Param(f"{name}.bias", (d,), "norm"))
        return params

    def linear(name: str, n_in: int, n_out: int) -> list[Param]:
        params = [Param(f"{name}.weight", (n_out, n_in), "matrix")]
        if cfg.bias:
            params.append(Param(f"{name}.bias", (n_out,), "bias"))
        return params

    block = norm("norm1") + linear("attn.qkv", d, 3 * d) + linear("attn.proj", d, d)
    block += norm("norm2") + linear("mlp.fc", d, f)
    if cfg.activation == "swiglu":
        block += linear("mlp.gate", d, f)
    block += linear("mlp.proj", f, d)
    outside = [Param("tok_emb.weight", (vocab_size, d), "embedding")]
    if cfg.positions == "learned":
        outside.append(Param("pos_emb.weight", (cfg.max_seq_len or seq_len, d), "embedding"))
    if cfg.norm_position == "pre":  # post-norm blocks end in a norm already
        outside += norm("norm_f")
    if not cfg.tie_embeddings:
        outside.append(Param("lm_head.weight", (vocab_size, d), "head"))
    return Layout(outside, block, cfg.n_layer)


def parameters(cfg: ModelConfig, vocab_size: int, seq_len: int) -> list[Param]:
    """Every parameter by name (what ``named_parameters()`` of the built model lists)."""
    lay = layout(cfg, vocab_size, seq_len)
    blocks = [Param(f"blocks.{i}.{p.name}", p.shape, p.kind)
              for i in range(lay.n_layer) for p in lay.block]
    return lay.outside + blocks


def optimizer_state_bytes(cfg: RunConfig, lay: Layout) -> int:
    """Bytes of the optimizer's state tensors once it has stepped (what
    ``lmlab.optim.optimizer_state_bytes`` reports for the real optimizer)."""
    name = cfg.optimizer.name

    def state(p: Param) -> int:
        if name == "adamw" or (name == "muon" and p.kind != "matrix"):
            # two moments; torch's AdamW also keeps its step as a tensor, Muon's AdamW an int
            return 2 * p.numel * FP32 + (FP32 if name == "adamw" else 0)
        if name in ("muon", "lion") or (name == "sgd" and cfg.optimizer.momentum > 0):
            return p.numel * FP32  # one momentum buffer
        if name == "adafactor":  # a factored second moment for matrices, a full one for vectors
            return FP32 + (sum(p.shape) if len(p.shape) == 2 else p.numel) * FP32
        return 0

    return sum(map(state, lay.outside)) + lay.n_layer * sum(map(state, lay.block))


def activation_bytes(cfg: RunConfig, vocab_size: int) -> int:
    """What autograd keeps for one micro-batch's backward pass (inputs of norms, matmuls,
    activation functions and attention; dropout masks), plus the fused head's gradients for the
    hidden states and the head weight, alive until the backward pass has used them."""
    m, tc = cfg.model, cfg.train
    tokens = tc.micro_batch_size * tc.seq_len
    d, f, heads, t = m.d_model, m.mlp_width, m.n_head, tc.seq_len
    wide = FP32  # norms, residual stream and softmax statistics stay fp32 under autocast
    narrow = FP32 if tc.precision == "fp32" else 2  # matmul operands are cast down
    # Per block and token: two norm inputs (+ their mean/rstd), the qkv input, q/k/v, the
    # attention output and the projection's input; in the MLP the fc input, then GELU's input
    # and output, or SwiGLU's gate, fc and product and SiLU's output.
    block = 2 * (d * wide + 2 * wide) + d * narrow + 3 * d * narrow + 2 * d * narrow
    block += d * narrow + (4 * f * narrow if m.activation == "swiglu" else 2 * f * narrow)
    if m.positions == "rope":  # the rotation keeps q and k's halves
        block += 2 * d * narrow
    if m.attention == "manual":  # the softmax output, T x T per head, in fp32
        block += heads * t * wide
    else:
        block += heads * wide  # the fused kernels keep only a log-sum-exp per row
    if m.dropout > 0:
        block += 2 * d  # one-byte masks after the attention projection and the MLP
        if m.attention == "manual":  # the attention dropout's mask and output
            block += heads * t * (1 + narrow)
        # (SDPA with dropout: the fused CUDA kernels keep only an RNG state; PyTorch's CPU
        # fallback materialises the T x T weights, which this lower bound leaves out.)
    every = tc.activation_checkpointing
    checkpointed = len(range(0, m.n_layer, every)) if every else 0
    per_token = (m.n_layer - checkpointed) * block + checkpointed * d * wide  # a checkpointed
    # block keeps only its input, and is recomputed one at a time once the head's backward has
    # used its saved gradients
    head = d * wide + 2 * wide + d * wide  # final norm's input and statistics; the gradient for
    # the hidden states (the final norm's output dtype)
    per_token += max(head, block if checkpointed else 0)
    return tokens * per_token + vocab_size * d * FP32  # + the head weight's gradient (fp32)


@dataclass(frozen=True)
class Footprint:
    """A run's memory, in bytes, as estimated from its config."""

    n_params: int
    params: int
    grads: int
    optimizer: int
    ema: int
    activations: int  # one micro-batch's, logits included
    evaluation: int  # one evaluation batch's logits and their log-softmax (no gradients)
    accumulates: bool  # grad_accum > 1: gradients stay alive while the next micro-batch runs
    optimizer_name: str

    @property
    def training(self) -> int:
        weights = self.params + self.optimizer + self.ema
        if self.accumulates:
            return weights + self.grads + self.activations
        # Gradients fill in as the backward pass frees activations: at least the larger one.
        return weights + max(self.grads, self.activations)

    @property
    def peak(self) -> int:
        return max(self.training, self.params + self.optimizer + self.ema + self.evaluation)

    def describe(self) -> str:
        parts = [f"parameters {size(self.params)} ({self.n_params:,} x 4 B)",
                 f"gradients {size(self.grads)}", f"{self.optimizer_name} state "
                 f"{size(self.optimizer)}"]
        if self.ema:
            parts.append(f"EMA weights {size(self.ema)}")
        parts.append(f"activations {size(self.activations)}")
        if self.evaluation > self.activations:
            parts.append(f"evaluation batch {size(self.evaluation)}")
        return f"at least {size(self.peak)} ({', '.join(parts)})"


    @property
    def weights(self) -> int:
        """What the model needs whatever the batch: weights, gradients, optimizer state, EMA."""
        return self.params + self.grads + self.optimizer + self.ema


def estimate(cfg: RunConfig, vocab_size: int | None = None) -> Footprint | None:
    """The footprint of ``cfg`` (None for a pretrained ``init_from``, whose shape is in its
    checkpoint). ``vocab_size`` defaults to what the tokenizer config asks for."""
    if cfg.train.init_from:
        return None
    vocab = vocab_size or cfg.tokenizer.planned_vocab_size
    lay = layout(cfg.model, vocab, cfg.train.seq_len)
    n = lay.numel
    eval_tokens = cfg.evaluation.batch_size * cfg.train.seq_len
    return Footprint(
        n_params=n, params=n * FP32, grads=n * FP32,
        optimizer=optimizer_state_bytes(cfg, lay), ema=n * FP32 if cfg.train.ema_decay else 0,
        activations=activation_bytes(cfg, vocab), evaluation=2 * eval_tokens * vocab * FP32,
        accumulates=cfg.train.grad_accum > 1, optimizer_name=cfg.optimizer.name)


def host_memory_bytes() -> int:
    """This machine's memory for one process: physical RAM, or the container's (cgroup) limit
    when that is lower."""
    limit = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


@dataclass(frozen=True)
class TooBig:
    """A config that cannot fit: what it needs, what there is, and the field to blame."""

    field: str  # a RunConfig path: the model's size, or the batch
    message: str


def check_fits(cfg: RunConfig, *, capacity: int | None = None, where: str = "this machine",
               vocab_size: int | None = None) -> TooBig | None:
    """A :class:`TooBig` when the estimate exceeds ``budget.max_memory_mb`` or, when given,
    ``capacity`` bytes (the memory of the device the run will have)."""
    fp = estimate(cfg, vocab_size)
    if fp is None:
        return None
    limits = [] if capacity is None else [(capacity, f"the {size(capacity)} of memory {where} has")]
    if cfg.budget.max_memory_mb:
        limits.append((int(cfg.budget.max_memory_mb * 2**20),
                       f"budget.max_memory_mb ({cfg.budget.max_memory_mb:g} MiB)"))
    if not limits:
        return None
    limit, what = min(limits)
    if fp.peak <= limit:
        return None
    if fp.weights > limit:  # the model alone does not fit, whatever the batch
        m = cfg.model
        field = "model"
        blame = (f"the model (n_layer {m.n_layer:,}, d_model {m.d_model:,}, vocabulary "
                 f"{vocab_size or cfg.tokenizer.planned_vocab_size:,})")
    else:
        tc = cfg.train
        field = "train.batch_size"
        blame = f"a micro-batch of {tc.micro_batch_size:,} x {tc.seq_len:,} tokens"
    hint = "" if field == "model" else \
        " (train.grad_accum splits the batch into smaller micro-batches)"
    return TooBig(field, f"{blame} needs {fp.describe()} to train: more than {what}{hint}")


def size(n: int | float) -> str:
    """Bytes for a message: 1.5 GiB, 12.0 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
