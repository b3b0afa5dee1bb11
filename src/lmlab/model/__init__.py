"""The model box: one decoder-only transformer (``gpt``), its attention (``attention``) and what
is applied around it (``wrap``)."""

from lmlab.model.attention import (
    CausalSelfAttention,
    RotaryEmbedding,
    apply_rope,
    attention_entropy,
)
from lmlab.model.gpt import (
    GPT,
    build_model,
    from_hf_gpt2,
    load_pretrained_gpt2,
    mlp_width,
)
from lmlab.model.wrap import apply_activation_checkpointing, is_checkpointed, maybe_compile

__all__ = [
    "GPT",
    "CausalSelfAttention",
    "RotaryEmbedding",
    "apply_activation_checkpointing",
    "apply_rope",
    "attention_entropy",
    "build_model",
    "from_hf_gpt2",
    "is_checkpointed",
    "load_pretrained_gpt2",
    "maybe_compile",
    "mlp_width",
]
