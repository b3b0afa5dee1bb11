"""The metrics of template section 6, checked by hand and on real (tiny) runs.

Diagnostics level: every number ``Diagnostics`` reports (gradient norms per block, per kind and per
norm parameter; update/weight ratios; activation RMS; attention entropy) is recomputed here from the
model's own tensors by an independent route and must agree. Loop level: a run logs the core
metrics on every row with step, tokens and wall-clock; the probe leaves the training curve
bit-identical; the hot path reads the device once per step and once per log interval.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import DiagnosticsConfig, ModelConfig, RunConfig
from lmlab.model import build_model
from lmlab.model.attention import CausalSelfAttention
from lmlab.spec.baseline import deep_merge
from lmlab.store import Store
from lmlab.train.diagnostics import Diagnostics
from lmlab.train.loop import train

VOCAB, T = 64, 16
DIAG_OFF = {"layer_grad_norms": False, "norm_grad_norms": False, "activation_norms": False,
            "attention_entropy": False, "update_ratio": False}
DIAG_PREFIXES = ("grad_norm/", "norm_grad_norm/", "update_ratio/", "act_rms/", "attn_entropy/")


def tiny_model(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layer": 3, "n_head": 2, "d_model": 32, **overrides})
    return build_model(cfg, VOCAB, T)


def backward_once(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (3, T + 1), generator=g)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return idx[:, :-1]


def probe_batch(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def l2(tensors: list[torch.Tensor]) -> float:
    """The reference norm: float64, summed by hand."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


# -- gradient norms -------------------------------------------------------------------------------


def hand_kind(name: str) -> str:
    """The kind of a GPT parameter, read off its name (independently of classify_params)."""
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if "norm" in name.split(".")[-2]:  # norm1, norm2, norm_f
        return "norm"
    return "bias" if name.endswith(".bias") else "matrix"


@pytest.mark.parametrize("arch", [
    {"norm": "layernorm", "bias": True, "tie_embeddings": False},
    {"norm": "rmsnorm", "bias": False, "tie_embeddings": True, "positions": "rope",
     "activation": "swiglu"},
])
def test_grad_norms_match_a_hand_computation(arch: dict) -> None:
    model = tiny_model(**arch)
    backward_once(model)
    got = Diagnostics(DiagnosticsConfig(), model, probe_batch()).grad_norms()

    named = dict(model.named_parameters())
    expected: dict[str, float] = {}
    for i in range(3):
        expected[f"grad_norm/block.{i}"] = l2(
            [p.grad for n, p in named.items() if n.startswith(f"blocks.{i}.")])
    for kind in {hand_kind(n) for n in named}:
        expected[f"grad_norm/kind.{kind}"] = l2(
            [p.grad for n, p in named.items() if hand_kind(n) == kind])
    for n, p in named.items():
        if hand_kind(n) == "norm":
            expected[f"norm_grad_norm/{n}"] = l2([p.grad])

    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    # The kinds partition the parameters: their norms add up (in quadrature) to the global norm.
    total = l2([p.grad for p in model.parameters()])
    kinds = math.sqrt(sum(v**2 for k, v in got.items() if k.startswith("grad_norm/kind.")))
    assert kinds == pytest.approx(total, rel=1e-5)
    if arch["norm"] == "rmsnorm":  # RMSNorm has weights only
        assert not any(k.endswith(".bias") for k in got if k.startswith("norm_grad_norm/"))
    else:
        assert "norm_grad_norm/blocks.1.norm2.bias" in got and "norm_grad_norm/norm_f.weight" in got


def test_update_ratio_matches_a_hand_computation() -> None:
    model = tiny_model()
    diag = Diagnostics(DiagnosticsConfig(), model, probe_batch())
    backward_once(model)
    before_by_hand = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = diag.snapshot()
    assert snapshot is not None
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    got = diag.update_ratios(snapshot)

    after = dict(model.named_parameters())
    assert set(got) == {f"update_ratio/block.{i}" for i in range(3)}
    for i in range(3):
        names = [n for n, p in after.items() if n.startswith(f"blocks.{i}.") and p.ndim >= 2]
        delta = l2([after[n] - before_by_hand[n] for n in names])
        weight = l2([before_by_hand[n] for n in names])
        assert got[f"update_ratio/block.{i}"] == pytest.approx(delta / weight, rel=1e-5)
        assert 0 < got[f"update_ratio/block.{i}"] < 1


# -- the probe batch: activations and attention entropy -------------------------------------------


def hand_forward(model: torch.nn.Module, idx: torch.Tensor) -> tuple[dict[int, float],
                                                                     dict[int, torch.Tensor]]:
    """The residual stream after each block, and each layer's attention entropy per head
    (averaged over sequences and positions), with the softmax written out here."""
    rms: dict[int, float] = {}
    entropy: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.size(1)))
        for i, block in enumerate(model.blocks):
            a = block.attn
            h = block.norm1(x)
            B, L, C = h.shape
            q, k, _ = a.qkv(h).split(C, dim=2)
            q = q.view(B, L, a.n_head, a.head_dim).transpose(1, 2)
            k = k.view(B, L, a.n_head, a.head_dim).transpose(1, 2)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(a.head_dim)
            scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            p = scores.softmax(dim=-1).double()
            plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
            entropy[i] = (-plogp.sum(-1)).mean(dim=(0, 2))  # per head
            x = block(x)
            rms[i] = float(x.double().pow(2).mean().sqrt())
    return rms, entropy


def test_activation_rms_and_attention_entropy_match_a_hand_computation() -> None:
    model = tiny_model(n_layer=4, dropout=0.1)  # dropout: the probe must run in eval mode
    model.train()
    idx = probe_batch()
    got = Diagnostics(DiagnosticsConfig(), model, idx).probe()
    model.eval()
    rms, entropy = hand_forward(model, idx)

    # First, middle and last block of four: 0, 2, 3.
    assert {k for k in got if k.startswith("act_rms/")} == {f"act_rms/block.{i}" for i in (0, 2, 3)}
    for i in (0, 2, 3):
        assert got[f"act_rms/block.{i}"] == pytest.approx(rms[i], rel=1e-5)
    for layer in range(4):
        assert got[f"attn_entropy/layer.{layer}"] == pytest.approx(float(entropy[layer].mean()),
                                                                   rel=1e-5)
        for head in range(2):
            assert got[f"attn_entropy/layer.{layer}.head.{head}"] == pytest.approx(
                float(entropy[layer][head]), rel=1e-5)


def test_uniform_causal_attention_has_entropy_log_i_plus_1() -> None:
    """Zero queries and keys: every position i attends uniformly to its i+1 keys, entropy
    log(i+1), so the probe's mean over positions is mean(log(1..T)) in every layer and head."""
    model = tiny_model()
    d = model.cfg.d_model
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * d].zero_()
            block.attn.qkv.bias[: 2 * d].zero_()
    # Capture the probabilities too, to check the exact per-position values.
    probs = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda m, _i, _o: probs.append(m.last_probs.clone()))
    got = Diagnostics(DiagnosticsConfig(), model, probe_batch()).probe()

    per_position = torch.log(torch.arange(1, T + 1, dtype=torch.float64))
    for p in probs:
        ent = torch.special.entr(p.double()).sum(-1)  # (B, H, T)
        torch.testing.assert_close(ent, per_position.expand_as(ent), rtol=0, atol=1e-6)
    expected = float(per_position.mean())
    for layer in range(3):
        assert got[f"attn_entropy/layer.{layer}"] == pytest.approx(expected, abs=1e-6)
        for head in range(2):
            assert got[f"attn_entropy/layer.{layer}.head.{head}"] == pytest.approx(expected, abs=1e-6)


def test_one_hot_attention_has_zero_entropy() -> None:
    """Queries = keys = a large multiple of the (layer-normed) input: each position's score with
    itself beats every other by thousands, the softmax is exactly one-hot, the entropy 0."""
    model = tiny_model(n_head=1)
    d = model.cfg.d_model
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.qkv.weight
            w[:d] = 100 * torch.eye(d)
            w[d: 2 * d] = 100 * torch.eye(d)
            block.attn.qkv.bias[: 2 * d].zero_()
    got = Diagnostics(DiagnosticsConfig(), model, probe_batch()).probe()
    for layer in range(3):
        assert got[f"attn_entropy/layer.{layer}"] == pytest.approx(0.0, abs=1e-7)
        assert got[f"attn_entropy/layer.{layer}.head.0"] == pytest.approx(0.0, abs=1e-7)


def test_probe_touches_no_gradient_rng_or_mode() -> None:
    model = tiny_model(dropout=0.2)
    model.train()
    model.blocks[1].eval()  # a submodule deliberately in eval mode stays so
    backward_once(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    diag = Diagnostics(DiagnosticsConfig(), model, probe_batch())
    diag.grad_norms()
    diag.update_ratios(diag.snapshot())
    diag.probe()
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n]), n
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert all(not m.capture_probs and m.last_probs is None
               for m in model.modules() if isinstance(m, CausalSelfAttention))


def test_flags_switch_each_diagnostic_off() -> None:
    model = tiny_model()
    backward_once(model)
    off = Diagnostics(DiagnosticsConfig(**DIAG_OFF), model, probe_batch())
    assert off.grad_norms() == {} and off.probe() == {} and off.snapshot() is None
    assert not off.due(0)
    only_entropy = Diagnostics(DiagnosticsConfig(**{**DIAG_OFF, "attention_entropy": True}),
                               model, probe_batch()).probe()
    assert only_entropy and all(k.startswith("attn_entropy/") for k in only_entropy)
    cadence = Diagnostics(DiagnosticsConfig(every_steps=5), model, probe_batch())
    assert [s for s in range(12) if cadence.due(s)] == [0, 5, 10]


# -- loop level: real runs ------------------------------------------------------------------------


def run_cfg(articles_data: dict, **sections: dict) -> RunConfig:
    tree: dict = {
        "data": articles_data,
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 4, "seq_len": 32, "device": "cpu"},
        "budget": {"steps": 12},
        "evaluation": {"every_steps": 6, "max_batches": 2, "batch_size": 8, "test_at_end": False,
                       "diagnostics": {"every_steps": 2}},
        "cadence": {"log_every_steps": 4},
    }
    return RunConfig.model_validate(deep_merge(tree, sections))


def run(cfg: RunConfig, tmp: Path, run_id: str = "r") -> tuple[Store, str]:
    store = Store.open(tmp)
    store.add_run(run_id, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    result = train(cfg, run_id, store, tmp / "runs" / run_id)
    assert result.status == "completed"
    return store, run_id


def test_core_metrics_are_logged_with_step_tokens_and_wall(articles_data: dict,
                                                           tmp_path: Path) -> None:
    cfg = run_cfg(articles_data, evaluation={"diagnostics": DIAG_OFF})
    store, rid = run(cfg, tmp_path)
    m = store.metrics(rid)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

    loss = m["train_loss"]
    assert [r.step for r in loss] == list(range(1, 13))
    assert all(r.tokens == r.step * tokens_per_step for r in loss)
    walls = [r.wall_s for r in loss]
    assert all(w > 0 for w in walls) and walls == sorted(walls)
    assert all(math.isfinite(r.value) for r in loss)
    assert [r.step for r in m["grad_norm"]] == list(range(1, 13))
    assert all(r.value > 0 for r in m["grad_norm"])
    # Validation at step 0, 6 and 12; perplexity is exp(loss).
    assert [r.step for r in m["val_loss"]] == [0, 6, 12]
    for vl, vp in zip(m["val_loss"], m["val_ppl"], strict=True):
        assert vp.value == pytest.approx(math.exp(vl.value))
    assert m["val_loss"][-1].value < m["val_loss"][0].value
    # Speed and memory once per log interval, on the interval's last row (an evaluation closes
    # the interval early, so its rows never precede the train rows of their steps: step 6).
    for name in ("step_time_s", "tokens_per_s", "peak_mem_bytes"):
        assert [r.step for r in m[name]] == [4, 6, 8, 12], name
    for st, tps in zip(m["step_time_s"], m["tokens_per_s"], strict=True):
        assert st.value > 0 and st.value * tps.value == pytest.approx(tokens_per_step)
    assert all(r.value > 2**20 for r in m["peak_mem_bytes"])  # a process's RSS: many MiB
    # Every row of every metric carries the x-axes of its step (train rows are the reference).
    at = {r.step: (r.tokens, r.wall_s) for r in loss}
    for name, rows in m.items():
        for r in rows:
            if r.step in at:
                assert (r.tokens, r.wall_s) == at[r.step], name
    summary = store.run(rid)["summary"]
    assert summary["peak_mem_kind"] == "rss" and summary["peak_mem_bytes"] > 2**20
    assert not any(n.startswith(DIAG_PREFIXES) for n in m)


def test_grad_norm_is_logged_before_clipping(articles_data: dict, tmp_path: Path) -> None:
    """Step 1 is the same computation with or without clipping: the logged global and layer-wise
    norms must be the same numbers, far above the clip threshold."""
    clipped, _ = run(run_cfg(articles_data, train={"grad_clip": 1e-3}, budget={"steps": 2},
                             cadence={"log_every_steps": 1}), tmp_path / "a")
    free, _ = run(run_cfg(articles_data, train={"grad_clip": None}, budget={"steps": 2},
                          cadence={"log_every_steps": 1}), tmp_path / "b")
    names = ["grad_norm", "grad_norm/block.0", "grad_norm/kind.matrix"]
    a, b = clipped.metrics("r", names), free.metrics("r", names)
    for name in names:
        assert a[name][0].step == 1 and a[name][0].value == b[name][0].value, name
    assert a["grad_norm"][0].value > 100 * 1e-3


def test_probe_does_not_change_the_training_curve(articles_data: dict, tmp_path: Path) -> None:
    """Diagnostics every 2 steps vs none, with dropout on: identical losses, bit for bit."""
    on, _ = run(run_cfg(articles_data), tmp_path / "on")
    off, _ = run(run_cfg(articles_data, evaluation={"diagnostics": DIAG_OFF}), tmp_path / "off")
    for name in ("train_loss", "grad_norm", "val_loss"):
        a, b = on.metrics("r", [name])[name], off.metrics("r", [name])[name]
        assert [(r.step, r.value) for r in a] == [(r.step, r.value) for r in b], name
    assert not any(n.startswith(DIAG_PREFIXES) for n in off.metric_names("r"))

    # The diagnostics run logged every diagnostic at steps 1, 3, 5, ... (probed before steps
    # 0, 2, 4, ...), each row with the step's tokens and wall-clock.
    m = on.metrics("r")
    at = {r.step: (r.tokens, r.wall_s) for r in m["train_loss"]}
    expected_names = (
        {f"grad_norm/block.{i}" for i in range(2)} | {f"update_ratio/block.{i}" for i in range(2)}
        | {f"act_rms/block.{i}" for i in range(2)}
        | {f"attn_entropy/layer.{i}" for i in range(2)}
        | {f"attn_entropy/layer.{i}.head.{h}" for i in range(2) for h in range(2)}
        | {f"grad_norm/kind.{k}" for k in ("bias", "embedding", "matrix", "norm")}
        | {f"norm_grad_norm/blocks.{i}.norm{j}.{w}" for i in range(2) for j in (1, 2)
           for w in ("weight", "bias")}
        | {"norm_grad_norm/norm_f.weight", "norm_grad_norm/norm_f.bias"})
    assert {n for n in m if n.startswith(DIAG_PREFIXES)} == expected_names
    for name in expected_names:
        assert [r.step for r in m[name]] == [1, 3, 5, 7, 9, 11], name
        assert all((r.tokens, r.wall_s) == at[r.step] for r in m[name]), name
        assert all(math.isfinite(r.value) for r in m[name]), name
    for r in m["attn_entropy/layer.0"]:  # causal attention over 32 positions
        assert 0 <= r.value <= math.log(32)


class _Reads:
    """Counts host reads of tensor values (bool/float/item/tolist) made from given files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, files: tuple[str, ...]) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        for method in ("__bool__", "__float__", "item", "tolist"):
            original = getattr(torch.Tensor, method)

            def wrapper(self_t: torch.Tensor, *a: object, _orig=original, _m=method) -> object:
                caller = sys._getframe(1).f_code.co_filename
                for f in files:
                    if caller.endswith(f):
                        self.counts[(f, _m)] += 1
                return _orig(self_t, *a)

            monkeypatch.setattr(torch.Tensor, method, wrapper)


def test_hot_path_reads_the_device_once_per_step_and_once_per_interval(
        articles_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 steps, a log interval of 4, evaluations at steps 0, 6, 12, diagnostics every 4 steps:
    the training step reads one finiteness flag per step, the recorder the interval's losses
    and gradient norms in one read per flush (4: steps 4, 8, 12 and 6, before the evaluation),
    evaluation one NLL total per pass (3); the diagnostics read three times per probe (gradient
    norms, update ratios, probe forward) at steps 0, 4, 8. Nothing else in the loop reads."""
    files = ("lmlab/train/loop.py", "lmlab/train/step.py", "lmlab/train/recorder.py",
             "lmlab/train/evaluate.py", "lmlab/train/state.py", "lmlab/train/diagnostics.py")
    reads = _Reads(monkeypatch, files)
    run(run_cfg(articles_data, evaluation={"diagnostics": {"every_steps": 4}}), tmp_path)
    assert reads.counts == Counter({
        ("lmlab/train/step.py", "__bool__"): 12,
        ("lmlab/train/recorder.py", "tolist"): 4,
        ("lmlab/train/evaluate.py", "item"): 3,
        ("lmlab/train/diagnostics.py", "tolist"): 9,
    })
