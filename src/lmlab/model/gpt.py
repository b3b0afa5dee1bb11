"""One decoder-only transformer: GPT-2 by default, with the knobs architecture experiments turn.

Read top to bottom: the MLP, the block, the model, then loading GPT-2's pretrained weights. The
forward pass is plain on purpose: activation checkpointing and torch.compile are applied from the
outside (``lmlab.model.wrap``), mixed precision and DDP by the training loop, and the loss (with
z-loss and label smoothing) is the loop's job too, so the model only maps tokens to logits.

References: nanoGPT's model.py (structure, init), GPT-2 (pre-norm, scaled residual init, tied
embeddings), Vaswani et al. 2017 (post-norm), Shazeer 2020 (SwiGLU), Su et al. 2021 (RoPE).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.config import ModelConfig, expand_path
from lmlab.errors import UserError
from lmlab.model.attention import CausalSelfAttention, SdpaBackend

# GPT-2's layer-norm epsilon, used for every norm so a pretrained GPT-2 loads exactly.
NORM_EPS = 1e-5

ParamKind = Literal["embedding", "head", "norm", "bias", "matrix"]


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=NORM_EPS)  # RMSNorm has no bias by construction
    return nn.LayerNorm(cfg.d_model, eps=NORM_EPS, bias=cfg.bias)


def mlp_width(cfg: ModelConfig) -> int:
    """The MLP hidden width (the rule is :attr:`ModelConfig.mlp_width`'s)."""
    return cfg.mlp_width


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_width(cfg)
        self.swiglu = cfg.activation == "swiglu"
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        # SwiGLU: a second input projection whose SiLU gates the first, elementwise.
        self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if self.swiglu else None
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.fc(x)
        else:
            # The tanh approximation is GPT-2's own ("gelu_new"); pretrained weights expect it.
            h = F.gelu(self.fc(x), approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """One transformer layer: attention then MLP, each with a residual connection.

    pre-norm (GPT-2): ``x + f(norm(x))``, the residual stream itself is never normalised, which
    is what lets deep stacks train without warmup tricks. post-norm (the original Transformer):
    ``norm(x + f(x))``.
    """

    def __init__(self, cfg: ModelConfig, max_seq_len: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = _norm(cfg)
        self.attn = CausalSelfAttention(
            cfg.d_model, cfg.n_head, max_seq_len=max_seq_len, bias=cfg.bias, dropout=cfg.dropout,
            rope=cfg.positions == "rope", rope_theta=cfg.rope_theta, impl=cfg.attention,
            sdpa_backend=cfg.sdpa_backend)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        else:
            x = self.norm1(x + self.attn(x))
            x = self.norm2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    """Tokens [B, T] -> next-token logits [B, T, vocab_size] (fp32).

    ``max_seq_len`` sizes the position table (learned) or the rotary tables (rope);
    ``cfg.max_seq_len``, when set, wins over the argument.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len or max_seq_len

        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        # With rope, positions enter inside attention (rotating q and k) and there is no table.
        self.pos_emb = (nn.Embedding(self.max_seq_len, cfg.d_model)
                        if cfg.positions == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.max_seq_len) for _ in range(cfg.n_layer))
        # Pre-norm leaves the residual stream unnormalised, so it needs one final norm before the
        # head; post-norm blocks already end in a norm.
        self.norm_f = _norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        # No bias on the head, whatever cfg.bias says: GPT-2 has none, and a tied head's bias
        # would be the only untied part of it.
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One matrix both embeds tokens and scores them (Press & Wolf 2017): the head's
            # weight IS the embedding's, and named_parameters() lists it once, as tok_emb.weight.
            self.lm_head.weight = self.tok_emb.weight

        self.apply(self._init_weights)
        if cfg.scaled_init:
            # GPT-2: each block adds two projections' outputs to the residual stream, so its
            # variance grows with depth unless those projections start 1/sqrt(2·n_layer) smaller.
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
            for block in self.blocks:
                nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
                nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # Norms keep PyTorch's init: weight 1, bias 0, i.e. the identity after normalising.

    def forward(self, idx: Tensor) -> Tensor:
        # fp32 logits even under autocast: the softmax over the vocabulary, z-loss and label
        # smoothing all need the range.
        return self.lm_head(self.hidden(idx)).float()

    def hidden(self, idx: Tensor) -> Tensor:
        """Tokens [B, T] -> the final hidden states [B, T, d_model], before the head. Training
        fuses the head with its loss (``lmlab.train.loss``), so it never holds the logits."""
        seq_len = idx.size(1)
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence of length {seq_len} is longer than "
                             f"max_seq_len={self.max_seq_len}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(seq_len, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)

    # -- bookkeeping used by the optimizer grouping, the diagnostics and MFU ------------------

    def param_kinds(self) -> dict[str, ParamKind]:
        """Each parameter name (as named_parameters() gives them, a tied weight once) -> its kind.

        "embedding": lookup tables (tok_emb, pos_emb; a tied head is tok_emb.weight), "head": an
        untied lm_head, "norm": a norm's weight or bias, "bias": a Linear's bias, "matrix": a
        Linear's weight inside the blocks, the only kind Muon orthogonalises.
        """
        kinds: dict[str, ParamKind] = {}
        for name, _ in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, nn.Embedding):
                kinds[name] = "embedding"
            elif module is self.lm_head:
                kinds[name] = "head"
            elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
                kinds[name] = "norm"
            elif leaf == "bias":
                kinds[name] = "bias"
            else:
                kinds[name] = "matrix"
        return kinds

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied weight once.

        ``exclude_embeddings`` leaves out the pure lookup tables, the weights that do no matmul
        per token: the position table, and the token table unless it is tied to the head (then it
        does the head's matmul). That is the N of the 6N FLOPs estimate, and it is the same number
        for a tied and an untied model of the same shape.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.lm_head.weight is not self.tok_emb.weight:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for the weight matmuls plus
        12·L·H·Q·T for attention scores and their weighted sum (PaLM appendix B, nanoGPT's
        estimate_mfu). Divide by step time and peak FLOP/s for MFU."""
        n_head, head_dim = self.cfg.n_head, self.cfg.d_model // self.cfg.n_head
        attention = 12 * self.cfg.n_layer * n_head * head_dim * seq_len
        return float(6 * self.num_params(exclude_embeddings=True) + attention)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> GPT:
    """The model of a run: ``seq_len`` is the training sequence length (cfg.max_seq_len wins)."""
    return GPT(cfg, vocab_size, seq_len)


# ---------------------------------------------------------------------------------------------
# Pretrained GPT-2. Hugging Face's GPT2LMHeadModel stores its linear layers as Conv1D, whose
# weight is [in, out]: the transpose of nn.Linear's. Everything else maps one to one.

_HF_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of older checkpoints


def from_hf_gpt2(state_dict: Mapping[str, Tensor], n_head: int | None = None,
                 config: Mapping[str, Any] | None = None, *, dropout: float = 0.0,
                 attention: Literal["sdpa", "manual"] = "sdpa",
                 sdpa_backend: SdpaBackend = "auto") -> GPT:
    """A GPT holding the weights of a HF ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict.

    Shapes (layers, width, MLP width, vocabulary, context) come from the state dict. The head
    count cannot be read from shapes: pass ``n_head`` or a HF ``config`` dict (config.json). The
    result is pre-norm LayerNorm (eps 1e-5), tanh GELU, learned positions, with biases, and tied
    unless the state dict holds a separate lm_head. ``dropout``, ``attention`` and
    ``sdpa_backend`` change no weights and are the caller's choice.
    """
    config = dict(config or {})
    if n_head is None:
        n_head = config.get("n_head")
    if n_head is None:
        raise ValueError("from_hf_gpt2 needs n_head, or a config with 'n_head'")
    _check_hf_config(config)

    # GPT2LMHeadModel prefixes the body with "transformer."; GPT2Model and the hub's own gpt2
    # files don't. Normalise to the unprefixed names.
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    vocab_size, d_model = sd["wte.weight"].shape
    n_positions = sd["wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    d_ff = sd["h.0.mlp.c_fc.weight"].shape[1]
    for key, value in (("n_embd", d_model), ("n_layer", n_layer), ("vocab_size", vocab_size),
                       ("n_positions", n_positions)):
        if key in config and config[key] != value:
            raise ValueError(f"config says {key}={config[key]} but the weights have {value}")
    head = sd.get("lm_head.weight")
    tied = head is None or torch.equal(head, sd["wte.weight"])

    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=d_ff, dropout=dropout,
                      bias=True, tie_embeddings=tied, norm="layernorm", norm_position="pre",
                      positions="learned", activation="gelu", attention=attention,
                      sdpa_backend=sdpa_backend, max_seq_len=n_positions)
    model = GPT(cfg, vocab_size, n_positions)

    ours: dict[str, Tensor] = {
        "tok_emb.weight": sd.pop("wte.weight"),
        "pos_emb.weight": sd.pop("wpe.weight"),
        "norm_f.weight": sd.pop("ln_f.weight"),
        "norm_f.bias": sd.pop("ln_f.bias"),
    }
    sd.pop("lm_head.weight", None)
    ours["lm_head.weight"] = ours["tok_emb.weight"] if tied else head
    hf_to_ours = {"ln_1": "norm1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                  "ln_2": "norm2", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(n_layer):
        for hf_name, our_name in hf_to_ours.items():
            weight = sd.pop(f"h.{i}.{hf_name}.weight")
            conv1d = not hf_name.startswith("ln_")
            ours[f"blocks.{i}.{our_name}.weight"] = weight.t() if conv1d else weight
            ours[f"blocks.{i}.{our_name}.bias"] = sd.pop(f"h.{i}.{hf_name}.bias")
    leftover = [k for k in sd if not k.endswith(_HF_BUFFERS)]
    if leftover:
        raise ValueError(f"unexpected keys in the GPT-2 state dict: {sorted(leftover)[:5]}")
    model.load_state_dict(ours, strict=True)
    return model


def _check_hf_config(config: Mapping[str, Any]) -> None:
    """Refuse GPT-2 variants whose forward this model does not reproduce."""
    problems = []
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={config['activation_function']!r}")
    if config.get("layer_norm_epsilon", NORM_EPS) != NORM_EPS:
        problems.append(f"layer_norm_epsilon={config['layer_norm_epsilon']}")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if problems:
        raise ValueError("unsupported GPT-2 variant: " + ", ".join(problems))


def load_pretrained_gpt2(name_or_dir: str, *, dropout: float = 0.0,
                         attention: Literal["sdpa", "manual"] = "sdpa",
                         sdpa_backend: SdpaBackend = "auto") -> GPT:
    """GPT-2 weights from a local HF checkpoint directory (config.json + model.safetensors or
    pytorch_model.bin), or from the hub by id ("gpt2", "openai-community/gpt2-medium", ...)."""
    runtime: dict[str, Any] = {"dropout": dropout, "attention": attention,
                               "sdpa_backend": sdpa_backend}
    path = expand_path(name_or_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"pretrained GPT-2 '{name_or_dir}' is a file; give the checkpoint's "
                        "directory (config.json + model.safetensors)", field="train.init_from")
    if path.is_dir():
        state_dict, config = _read_hf_dir(path)
        return _convert(name_or_dir, state_dict, config, runtime)
    # Hub ids look like "gpt2" or "org/name"; anything path-shaped that doesn't exist is a typo.
    if path.is_absolute() or name_or_dir.startswith((".", "~", "$")) or name_or_dir.count("/") > 1:
        raise UserError(f"pretrained GPT-2 directory '{name_or_dir}' does not exist",
                        field="train.init_from")

    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"loading '{name_or_dir}' from the Hugging Face hub needs transformers: "
                        "pip install 'lmlab[dev]' (or pip install transformers), or point "
                        "init_from at a local checkpoint directory",
                        field="train.init_from") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        raise UserError(f"could not load pretrained GPT-2 '{name_or_dir}': no such local "
                        f"directory, and the hub download failed ({e})",
                        field="train.init_from") from None
    return _convert(name_or_dir, hf.state_dict(), hf.config.to_dict(), runtime)


def _convert(name: str, state_dict: Mapping[str, Tensor], config: dict[str, Any],
             runtime: dict[str, Any]) -> GPT:
    # A checkpoint of the wrong shape or variant is the user's input, not a bug.
    try:
        return from_hf_gpt2(state_dict, config=config, **runtime)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"'{name}' is not a GPT-2 checkpoint this model can load: {e}",
                        field="train.init_from") from None


def _read_hf_dir(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, config.json) of a HF checkpoint directory, without needing transformers."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint directory",
                        field="train.init_from")
    config = json.loads(config_file.read_text())
    if config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path} holds a '{config['model_type']}' model, not GPT-2",
                        field="train.init_from")

    index = path / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
              if index.is_file() else ["model.safetensors"])
    if all((path / shard).is_file() for shard in shards):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path / shards[0]} needs safetensors: pip install "
                            "safetensors", field="train.init_from") from None
        state_dict: dict[str, Tensor] = {}
        for shard in shards:
            state_dict.update(load_file(str(path / shard)))
        return state_dict, config
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True), config
    raise UserError(f"{path} has neither model.safetensors nor pytorch_model.bin",
                    field="train.init_from")
