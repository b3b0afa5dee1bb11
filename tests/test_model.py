"""The model: GPT-2 parity, the two attention paths, the entropy probe, every knob, the wrappers."""

from __future__ import annotations

import copy
import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import UserError
from lmlab.model import (
    GPT,
    apply_activation_checkpointing,
    apply_rope,
    attention_entropy,
    build_model,
    from_hf_gpt2,
    is_checkpointed,
    load_pretrained_gpt2,
    maybe_compile,
    mlp_width,
)

VOCAB, SEQ = 50, 12


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "d_model": 16, **overrides})


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))


# -- GPT-2 parity --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                     n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def test_from_hf_gpt2_matches_transformers(hf_gpt2) -> None:
    model = from_hf_gpt2(hf_gpt2.state_dict(), n_head=4).eval()
    assert model.cfg.n_layer == 2 and model.cfg.d_model == 64 and model.max_seq_len == 32
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_gpt2(idx).logits
        got = model(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_from_hf_gpt2_needs_heads_and_refuses_variants(hf_gpt2) -> None:
    with pytest.raises(ValueError, match="n_head"):
        from_hf_gpt2(hf_gpt2.state_dict())
    config = {**hf_gpt2.config.to_dict(), "activation_function": "relu"}
    with pytest.raises(ValueError, match="activation_function"):
        from_hf_gpt2(hf_gpt2.state_dict(), config=config)


def test_load_pretrained_gpt2_from_a_saved_directory(hf_gpt2, tmp_path) -> None:
    hf_gpt2.save_pretrained(tmp_path)
    model = load_pretrained_gpt2(str(tmp_path), attention="manual").eval()
    assert model.cfg.n_head == 4 and model.cfg.attention == "manual"
    idx = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_gpt2(idx).logits, atol=1e-5, rtol=0)


def test_load_pretrained_gpt2_user_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_gpt2(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"config\.json"):
        load_pretrained_gpt2(str(tmp_path))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(UserError, match="pip install"):
        load_pretrained_gpt2("gpt2")


# -- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_sdpa_and_manual_attention_agree(positions: str) -> None:
    torch.manual_seed(0)
    sdpa = GPT(tiny(positions=positions, attention="sdpa"), VOCAB, SEQ).eval()
    manual = GPT(tiny(positions=positions, attention="manual"), VOCAB, SEQ).eval()
    manual.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(manual(tokens()), sdpa(tokens()), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("positions", "attention"),
                         itertools.product(["learned", "rope"], ["sdpa", "manual"]))
def test_causality(positions: str, attention: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(positions=positions, attention=attention), VOCAB, SEQ).eval()
    idx = tokens(batch=1)
    changed = idx.clone()
    t = 7
    changed[0, t] = (idx[0, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=0, rtol=0)
    assert not torch.allclose(after[:, t], before[:, t])


def test_entropy_of_uniform_and_one_hot_attention() -> None:
    T = 6
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    entropy = attention_entropy(uniform[None, None])
    assert entropy.shape == (1, 1, T)
    torch.testing.assert_close(entropy[0, 0], torch.log(torch.arange(1, T + 1.0)))
    one_hot = torch.eye(T)[None, None]  # each query attends to itself only; zeros elsewhere
    assert torch.equal(attention_entropy(one_hot), torch.zeros(1, 1, T))


def test_captured_probabilities_are_causal_distributions() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(), VOCAB, SEQ).eval()  # sdpa: capture must switch to the manual path
    attn = model.blocks[1].attn
    attn.capture_probs = True
    with torch.no_grad():
        model(tokens(batch=3))
    probs = attn.last_probs
    assert probs is not None and probs.shape == (3, 2, SEQ, SEQ) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, SEQ))
    assert torch.all(probs.triu(diagonal=1) == 0)
    entropy = attention_entropy(probs)
    assert torch.all(entropy >= 0)
    assert torch.all(entropy <= torch.log(torch.arange(1, SEQ + 1.0)) + 1e-5)
    assert model.blocks[0].attn.last_probs is None  # only the flagged layer stores


def test_rope_scores_depend_only_on_relative_position() -> None:
    from lmlab.model import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=8, max_seq_len=32)
    cos, sin = rope(32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        q_m = apply_rope(q.expand(32, 8), cos, sin)[m]
        k_n = apply_rope(k.expand(32, 8), cos, sin)[n]
        return q_m @ k_n

    torch.testing.assert_close(score(5, 2), score(25, 22))
    torch.testing.assert_close(score(3, 3), q @ k)  # same position: the rotation cancels
    assert not torch.allclose(score(5, 2), score(5, 4))
    assert not any(name in ("cos", "sin") for name in rope.state_dict())


# -- knobs ----------------------------------------------------------------------------------------

KNOBS = list(itertools.product(["layernorm", "rmsnorm"], ["pre", "post"], ["learned", "rope"],
                               ["gelu", "swiglu"], [True, False], [True, False]))


@pytest.mark.parametrize(("norm", "norm_position", "positions", "activation", "bias", "tie"),
                         KNOBS)
def test_every_knob_combination_trains(norm, norm_position, positions, activation, bias,
                                       tie) -> None:
    torch.manual_seed(0)
    cfg = tiny(norm=norm, norm_position=norm_position, positions=positions, activation=activation,
               bias=bias, tie_embeddings=tie, dropout=0.1,
               attention="manual" if bias else "sdpa")
    model = build_model(cfg, VOCAB, SEQ)
    logits = model(tokens()[:, :-1])
    assert logits.shape == (2, SEQ - 1, VOCAB) and logits.dtype == torch.float32
    loss_of(model, tokens()).backward()
    names = dict(model.named_parameters())
    for name, p in names.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert ("pos_emb.weight" in names) == (positions == "learned")
    assert ("norm_f.weight" in names) == (norm_position == "pre")
    assert ("blocks.0.mlp.gate.weight" in names) == (activation == "swiglu")
    assert any(n.endswith(".bias") for n in names) == bias
    assert ("lm_head.weight" in names) == (not tie)
    kinds = model.param_kinds()
    assert list(kinds) == list(names)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_norm_position(norm_position: str) -> None:
    """Post-norm normalises the residual stream after every block; pre-norm never does."""
    torch.manual_seed(0)
    model = GPT(tiny(norm_position=norm_position), VOCAB, SEQ)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with torch.no_grad():
        model(tokens())
    for out in outputs:
        standardised = torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(
            out.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
        assert standardised == (norm_position == "post")


def test_mlp_widths() -> None:
    assert mlp_width(ModelConfig(d_model=256)) == 1024
    assert mlp_width(ModelConfig(d_model=256, activation="swiglu")) == 704  # 682.7 -> 704
    assert mlp_width(ModelConfig(d_model=192, activation="swiglu")) == 512  # exact multiple
    assert mlp_width(ModelConfig(d_model=256, activation="swiglu", d_ff=300)) == 300
    model = GPT(tiny(activation="swiglu"), VOCAB, SEQ)
    assert model.blocks[0].mlp.gate.weight.shape == (64, 16)


def test_tied_embeddings_share_storage() -> None:
    model = GPT(tiny(), VOCAB, SEQ)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    model.load_state_dict(GPT(tiny(), VOCAB, SEQ).state_dict())  # loading keeps the tie
    assert model.lm_head.weight is model.tok_emb.weight
    untied = GPT(tiny(tie_embeddings=False), VOCAB, SEQ)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() == model.num_params() + VOCAB * 16
    # Both do the same matmuls per token, so the compute-relevant count is the same.
    assert untied.num_params(exclude_embeddings=True) == model.num_params(exclude_embeddings=True)


def test_param_kinds() -> None:
    model = GPT(tiny(tie_embeddings=False), VOCAB, SEQ)
    kinds = model.param_kinds()
    assert set(kinds) == {n for n, _ in model.named_parameters()}
    assert kinds["tok_emb.weight"] == kinds["pos_emb.weight"] == "embedding"
    assert kinds["lm_head.weight"] == "head"
    assert kinds["blocks.0.norm1.weight"] == kinds["blocks.1.norm2.bias"] == "norm"
    assert kinds["norm_f.weight"] == "norm"
    assert kinds["blocks.0.attn.qkv.bias"] == kinds["blocks.1.mlp.proj.bias"] == "bias"
    params = dict(model.named_parameters())
    matrices = {n for n, k in kinds.items() if k == "matrix"}
    assert matrices == {f"blocks.{i}.{m}.weight" for i in range(2)
                        for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert all(params[n].ndim == 2 for n in matrices)
    tied = GPT(tiny(), VOCAB, SEQ).param_kinds()
    assert "lm_head.weight" not in tied and tied["tok_emb.weight"] == "embedding"


@pytest.mark.parametrize("scaled", [True, False])
def test_init_stds(scaled: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=128, init_std=0.02, scaled_init=scaled)
    model = GPT(cfg, 256, 16)
    residual_std = 0.02 / math.sqrt(8) if scaled else 0.02
    for block in model.blocks:
        for weight, std in ((block.attn.qkv.weight, 0.02), (block.mlp.fc.weight, 0.02),
                            (block.attn.proj.weight, residual_std),
                            (block.mlp.proj.weight, residual_std)):
            assert weight.std().item() == pytest.approx(std, rel=0.05)
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.proj.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_counts_and_flops() -> None:
    cfg = tiny()
    model = GPT(cfg, VOCAB, SEQ)
    d, L, ff = 16, 2, 64
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    total = VOCAB * d + SEQ * d + L * per_block + 2 * d
    assert model.num_params() == total
    assert model.num_params(exclude_embeddings=True) == total - SEQ * d
    assert model.flops_per_token(SEQ) == 6 * (total - SEQ * d) + 12 * L * d * SEQ
    assert GPT(tiny(max_seq_len=20), VOCAB, SEQ).pos_emb.num_embeddings == 20  # cfg wins
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))


# -- wrappers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_is_exact(every: int) -> None:
    torch.manual_seed(0)
    plain = GPT(tiny(n_layer=3, dropout=0.1), VOCAB, SEQ)
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain), every)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [is_checkpointed(b) for b in wrapped.blocks] == [i % every == 0 for i in range(3)]

    # Checkpointed blocks run their forward twice: once, then again during backward.
    calls = []
    wrapped.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))

    losses, grads = [], []
    for model in (plain, wrapped):
        torch.manual_seed(123)  # same dropout masks for both
        loss = loss_of(model, tokens())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_activation_checkpointing_survives_deepcopy() -> None:
    model = apply_activation_checkpointing(GPT(tiny(), VOCAB, SEQ), 1)
    clone = copy.deepcopy(model)  # what an EMA copy does
    assert all(is_checkpointed(b) for b in clone.blocks)
    assert all(b.forward.__self__ is b for b in clone.blocks)
    assert apply_activation_checkpointing(model, 0) is model


def test_maybe_compile(monkeypatch) -> None:
    model = GPT(tiny(), VOCAB, SEQ)
    assert maybe_compile(model, "off") == (model, None)
    compiled, reason = maybe_compile(model, "default")  # lazy: nothing compiles until a call
    assert reason is None and compiled is not model
    assert dict(compiled.named_parameters())["_orig_mod.tok_emb.weight"] is model.tok_emb.weight
    monkeypatch.setattr("torch._dynamo.is_dynamo_supported", lambda: False)
    same, reason = maybe_compile(model, "max-autotune")
    assert same is model and "not supported" in reason
