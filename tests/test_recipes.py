"""Optimizers and recipe knobs through the REAL training loop (``lmlab.train.loop.train``) on real
text: the WikiText-2 test-articles corpus (fixture ``articles_data``), byte tokenizer, a tiny GPT.

Each knob is checked by what a run records or leaves behind, not by calling its helper: the
rows in the store (tokens, lr, grad_norm, train_loss, val_loss), the run summary, the weights
the loop built and trained (captured by wrapping ``build_run_model``) and the final checkpoint.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lmlab.train.loop as loop
from lmlab.analysis.records import load_runs
from lmlab.analysis.records import status_row as status_row_of
from lmlab.config import RunConfig
from lmlab.data.batches import TrainBatcher, iter_eval_batches
from lmlab.data.tokenize import DataBundle, prepare_data
from lmlab.errors import UserError
from lmlab.optim import build_schedule, newton_schulz
from lmlab.spec.baseline import deep_merge
from lmlab.store import Store
from lmlab.train import step as step_module
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.evaluate import evaluate
from lmlab.train.preflight import overfit, preflight_config

BATCH, SEQ = 8, 64


def tiny(articles_data: dict, **sections: dict) -> RunConfig:
    """A 1-layer, d=32 GPT on bytes of real text; constant lr; probes off (speed)."""
    base = {
        "data": articles_data,
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"batch_size": BATCH, "seq_len": SEQ, "device": "cpu"},
        "budget": {"steps": 30},
        "evaluation": {"every_steps": 1000, "max_batches": 4, "test_at_end": False,
                       "diagnostics": {"layer_grad_norms": False, "norm_grad_norms": False,
                                       "activation_norms": False, "attention_entropy": False,
                                       "update_ratio": False}},
        "cadence": {"log_every_steps": 1, "checkpoint_every_steps": 1000},
    }
    return RunConfig.model_validate(deep_merge(base, sections))


@pytest.fixture(scope="module")
def byte_data(data_dir: Path) -> DataBundle:
    """The corpus of ``articles_data`` (function-scoped there), tokenized once per module."""
    articles = {"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
                "name": "wikitext-2-test-articles"}
    cfg = tiny(articles)
    return prepare_data(cfg.data, cfg.tokenizer)


class Run:
    """One finished run: its result, metric rows {name: [(step, tokens, value)]}, the model the
    loop built (trained in place) and that model's weights right after it was built."""

    def __init__(self, result: loop.RunResult, rows: dict[str, list[tuple[int, int, float]]],
                 model: torch.nn.Module, initial: dict[str, torch.Tensor], status_row: dict,
                 run_dir: Path) -> None:
        self.result, self.rows, self.model, self.initial = result, rows, model, initial
        self.status_row, self.run_dir = status_row, run_dir

    def values(self, name: str) -> list[float]:
        return [v for _, _, v in self.rows[name]]

    def at(self, name: str, step: int) -> float:
        return next(v for s, _, v in self.rows[name] if s == step)

    def delta(self) -> dict[str, torch.Tensor]:
        """Final minus initial weights, per parameter name (a tied weight once)."""
        return {n: p.detach() - self.initial[n] for n, p in self.model.named_parameters()}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, byte_data: DataBundle):
    """``run(cfg, name)`` trains ``cfg`` through ``lmlab.train.loop.train`` into a fresh store,
    keeping the model the loop built and a copy of its weights as built."""
    built: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    real_build = step_module.build_run_model

    def capture(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
        model = real_build(cfg, vocab_size)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(step_module, "build_run_model", capture)

    def go(cfg: RunConfig, name: str = "r", data: DataBundle | None = None) -> Run:
        built.clear()
        out = tmp_path / name
        with Store.open(out) as store:
            store.add_run(name, name, cfg.train.seed, cfg.to_json(), cfg.config_hash)
            result = loop.train(cfg, name, store, out / "run", data=data or byte_data)
            rows = {k: [(r.step, r.tokens, r.value) for r in v]
                    for k, v in store.metrics(name).items()}
            (status_row,) = [status_row_of(r) for r in load_runs(store)]
        (model, initial), = built
        return Run(result, rows, model, initial, status_row, out / "run")

    return go


# -- every optimizer trains ----------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": {"name": "adamw", "lr": 3e-3},
    "sgd": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True},
    "lion": {"name": "lion", "lr": 1e-3, "betas": [0.9, 0.99]},
    "adafactor": {"name": "adafactor", "lr": 3e-2},
    "muon": {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, "momentum": 0.95},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_a_tiny_gpt_on_real_text(run, articles_data, name: str) -> None:
    cfg = tiny(articles_data, optimizer=OPTIMIZERS[name], schedule={"name": "cosine"})
    r = run(cfg)
    assert r.result.status == "completed"
    assert r.rows["val_loss"][0][0] == 0  # the step-0 evaluation, before any update
    start, final = r.values("val_loss")[0], r.status_row["final_val_loss"]
    assert math.isfinite(final) and final < start - 0.3, (name, start, final)
    assert r.values("train_loss")[-1] < r.values("train_loss")[0]

    # Optimizer state size is reported (summary and `lmlab status --json`), per optimizer.
    state = r.result.summary["optimizer_state_bytes"]
    assert r.status_row["optimizer_state_bytes"] == state
    assert r.result.summary["optimizer_impl"] in ("fused", "foreach", "plain")
    fp32_params = 4 * sum(p.numel() for p in r.model.parameters())
    ratio = state / fp32_params
    expected = {"adamw": (2.0, 2.01),     # exp_avg + exp_avg_sq (+ scalar step tensors)
                "sgd": (1.0, 1.0),         # momentum buffer
                "lion": (1.0, 1.0),        # momentum
                "muon": (1.0, 2.0),        # matrices: momentum; the rest: AdamW's two moments
                "adafactor": (0.0, 0.99)}[name]  # factored second moment, no first moment
    assert expected[0] <= ratio <= expected[1], (name, ratio)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_multipliers_apply_per_group_for_every_optimizer(run, articles_data, name: str) -> None:
    """The same grouping for every optimizer: one real step with embedding_lr_mult 4 and
    head_lr_mult 0.5 moves embeddings exactly 4x and the (untied) head 0.5x as far as without
    the multipliers, and every other parameter exactly as far (the first step is linear in lr)."""
    common = {"budget": {"steps": 1}, "model": {"tie_embeddings": False}}
    plain = run(tiny(articles_data, **common, optimizer=OPTIMIZERS[name]), "plain")
    mult = run(tiny(articles_data, **common, optimizer={**OPTIMIZERS[name], "embedding_lr_mult": 4.0,
                                                       "head_lr_mult": 0.5}), "mult")
    kinds = plain.model.param_kinds()
    assert {"embedding", "head", "matrix", "norm"} <= set(kinds.values())
    d_plain, d_mult = plain.delta(), mult.delta()
    for n, kind in kinds.items():
        factor = {"embedding": 4.0, "head": 0.5}.get(kind, 1.0)
        assert d_plain[n].abs().max() > 0 or kind == "bias", n
        torch.testing.assert_close(d_mult[n], factor * d_plain[n], rtol=1e-4, atol=1e-8)


def _first_batch_grads(model: torch.nn.Module, initial: dict[str, torch.Tensor],
                       data: DataBundle, seed: int) -> dict[str, torch.Tensor]:
    """Gradient of plain CE at the initial weights on the loop's first training batch, computed
    as the loop computes it (the fused head and loss): where a gradient is at rounding level (a
    key bias's, analytically zero), AdamW's first step lr·g/(|g|+eps) follows its rounding."""
    from lmlab.train.loss import linear_cross_entropy

    probe = copy.deepcopy(model)
    probe.load_state_dict(initial, strict=False)
    x, y = TrainBatcher(data.splits["train"], seed, SEQ).batch(0, BATCH, SEQ)
    hidden = probe.hidden(x).flatten(0, 1)[None]
    reference, objective = linear_cross_entropy(hidden, probe.lm_head.weight[None],
                                                y.flatten()[None])
    torch.testing.assert_close(reference[0], F.cross_entropy(probe(x).flatten(0, 1), y.flatten()))
    objective.sum().backward()
    return {n: p.grad for n, p in probe.named_parameters()}


def test_muon_update_is_orthogonalised_in_the_loop_and_adamw_trains_the_rest(
        run, articles_data, byte_data) -> None:
    """One real Muon step: every hidden matrix moves by muon_lr x the Newton-Schulz
    orthogonalisation of its gradient, whose singular values are near 1 wherever the gradient
    has any; embeddings, norms and biases take AdamW's first step (|update| = lr, elementwise)."""
    lr, muon_lr = 1e-3, 0.05
    cfg = tiny(articles_data, budget={"steps": 1}, train={"grad_clip": None},
               optimizer={"name": "muon", "lr": lr, "muon_lr": muon_lr, "weight_decay": 0.0})
    r = run(cfg)
    kinds = r.model.param_kinds()
    delta = r.delta()
    grads = _first_batch_grads(r.model, r.initial, byte_data, seed=0)
    matrices = [n for n, k in kinds.items() if k == "matrix"]
    assert len(matrices) == 4  # qkv, attention proj, mlp fc, mlp proj
    for n in matrices:
        d, g = delta[n], grads[n]
        scale = math.sqrt(max(1.0, d.size(0) / d.size(1)))  # tall matrices get a boost
        update = -d / (muon_lr * scale)
        # The loop applied exactly Muon's update (momentum only rescales a first gradient) ...
        torch.testing.assert_close(update, newton_schulz(g, 5), rtol=0, atol=2e-3)
        # ... which is numerically orthogonal: no singular value above ~1.2, and every direction
        # in which the gradient is not negligible (sigma >= 2e-3 sigma_max: 5 quintic steps
        # amplify small values ~480x) lands in about [0.5, 1.2].
        sv = torch.linalg.svdvals(update)
        sg = torch.linalg.svdvals(g)
        assert sv.max() < 1.25, (n, sv)
        assert (sv > 0.5).sum() >= (sg >= 2e-3 * sg.max()).sum() >= len(sg) // 2, (n, sv, sg)
    for n, k in kinds.items():
        if k == "matrix":
            continue
        # AdamW's first step, bias-corrected: lr * g / (|g| + eps), i.e. lr unless g ~ eps.
        g = grads[n]
        assert (g != 0).any(), n
        torch.testing.assert_close(delta[n], -lr * g / (g.abs() + 1e-8), rtol=1e-3, atol=1e-7)


# -- recipe knobs --------------------------------------------------------------------------------


def test_seq_len_warmup_feeds_short_sequences_first(run, articles_data) -> None:
    cfg = tiny(articles_data, budget={"steps": 12},
               train={"seq_len_start": 16, "seq_len_warmup_steps": 8})
    r = run(cfg)
    tokens = [t for _, t, _ in r.rows["train_loss"]]
    per_step = [b - a for a, b in zip([0, *tokens], tokens, strict=False)]
    assert per_step == [BATCH * cfg.train.seq_len_at(s) for s in range(12)]
    assert per_step[0] == BATCH * 16 and per_step[-1] == BATCH * SEQ
    assert per_step[:9] == sorted(per_step[:9]) and len(set(per_step[:9])) == 9
    assert r.result.summary["tokens"] == cfg.train.tokens_after(12)


def test_batch_ramp_grows_the_batch_as_configured(run, articles_data) -> None:
    cfg = tiny(articles_data, budget={"steps": 10},
               train={"batch_size": 8, "grad_accum": 2, "batch_size_start": 2,
                      "batch_ramp_steps": 6})
    r = run(cfg)
    tokens = [t for _, t, _ in r.rows["train_loss"]]
    per_step = [b - a for a, b in zip([0, *tokens], tokens, strict=False)]
    assert per_step == [SEQ * cfg.train.batch_size_at(s) for s in range(10)]
    assert per_step[0] == 2 * SEQ and per_step[6:] == [8 * SEQ] * 4
    assert r.result.summary["tokens"] == cfg.train.tokens_after(10)


def _first_batch_ce(model: torch.nn.Module, initial: dict[str, torch.Tensor],
                    data: DataBundle, seed: int) -> float:
    """Plain cross-entropy of the initial weights on the loop's first training batch."""
    probe = copy.deepcopy(model)
    probe.load_state_dict(initial, strict=False)  # tied head: tok_emb.weight covers it
    probe.eval()
    x, y = TrainBatcher(data.splits["train"], seed, SEQ).batch(0, BATCH, SEQ)
    with torch.no_grad():
        return F.cross_entropy(probe(x).flatten(0, 1), y.flatten()).item()


def test_z_loss_and_label_smoothing_change_the_objective_not_the_reported_loss(
        run, articles_data, byte_data) -> None:
    steps = 40
    common = {"budget": {"steps": steps}, "optimizer": {"lr": 1e-2}}
    plain = run(tiny(articles_data, **common), "plain")
    smooth = run(tiny(articles_data, **common, train={"label_smoothing": 0.3}), "smooth")
    zl = run(tiny(articles_data, **common, train={"z_loss": 0.1}), "zloss")

    # train_loss is plain CE: the first step's value is the same for all three (same weights,
    # same batch) and equals the CE computed here; the objective's gradient is not.
    ce0 = _first_batch_ce(plain.model, plain.initial, byte_data, 0)
    for r in (plain, smooth, zl):
        assert r.at("train_loss", 1) == pytest.approx(ce0, rel=1e-5)
    assert smooth.at("grad_norm", 1) != pytest.approx(plain.at("grad_norm", 1), rel=1e-3)
    assert zl.at("grad_norm", 1) != pytest.approx(plain.at("grad_norm", 1), rel=1e-3)
    assert smooth.values("train_loss")[5:] != plain.values("train_loss")[5:]

    # ... and each objective does its job on held-out text.
    x, _ = next(iter_eval_batches(byte_data.splits["valid"], SEQ, 8))
    with torch.no_grad():
        logits = {k: r.model.eval()(x) for k, r in {"plain": plain, "smooth": smooth, "z": zl}.items()}
    lse = {k: torch.logsumexp(v, -1).pow(2).mean().item() for k, v in logits.items()}
    entropy = {k: torch.distributions.Categorical(logits=v).entropy().mean().item()
               for k, v in logits.items()}
    assert lse["z"] < 0.5 * lse["plain"], lse          # z-loss pulls log Z towards 0
    assert entropy["smooth"] > entropy["plain"] + 0.1, entropy  # smoothing flattens predictions


def test_ema_weights_are_what_is_evaluated(run, articles_data, byte_data) -> None:
    common = {"budget": {"steps": 20}, "optimizer": {"lr": 1e-2},
              "evaluation": {"every_steps": 5, "max_batches": 2}}
    live = run(tiny(articles_data, **common), "live")
    ema = run(tiny(articles_data, **common, train={"ema_decay": 0.9}), "ema")

    # Training is untouched (evaluation swaps the EMA in and the live weights back) ...
    assert ema.values("train_loss") == live.values("train_loss")
    assert ema.at("val_loss", 0) == live.at("val_loss", 0)  # EMA starts at the initial weights
    # ... but every later evaluation sees the averaged weights.
    for step in (5, 10, 15, 20):
        assert ema.at("val_loss", step) != pytest.approx(live.at("val_loss", step), abs=1e-4)
    # The final val loss is exactly the EMA weights' loss on the full split.
    averaged = load_checkpoint(ema.run_dir)["learner"]["ema"]
    model = copy.deepcopy(ema.model)
    for p, e in zip(model.parameters(), averaged, strict=True):
        assert not torch.equal(p, e)
        p.data.copy_(e)
    result = evaluate(model, byte_data.splits["valid"], byte_data.stats["valid"], SEQ, 16,
                           None, torch.device("cpu"), "fp32")
    assert result["loss"] == pytest.approx(ema.status_row["final_val_loss"], rel=1e-9)


@pytest.mark.parametrize("scaled_init", [True, False])
def test_init_std_sets_the_initial_weight_scale(run, articles_data, scaled_init: bool) -> None:
    results = {}
    for std in (0.002, 0.2):
        cfg = tiny(articles_data, budget={"steps": 1},
                   model={"n_layer": 2, "init_std": std, "scaled_init": scaled_init})
        r = run(cfg, f"std{std}")
        w = r.initial
        assert w["blocks.0.mlp.fc.weight"].std().item() == pytest.approx(std, rel=0.05)
        assert w["tok_emb.weight"].std().item() == pytest.approx(std, rel=0.05)
        proj = std / 2 if scaled_init else std  # GPT-2: std / sqrt(2 * n_layer)
        for n in ("blocks.1.attn.proj.weight", "blocks.1.mlp.proj.weight"):
            assert w[n].std().item() == pytest.approx(proj, rel=0.05), n
        results[std] = r.at("val_loss", 0)
    # Tiny weights predict a near-uniform distribution; large ones a confident, wrong one.
    assert results[0.002] == pytest.approx(math.log(256), abs=0.01)
    assert results[0.2] > math.log(256) + 0.05


def test_grad_clip_bounds_the_update_and_grad_norm_rows_are_pre_clip(run, articles_data) -> None:
    lr = 0.1
    sgd = {"name": "sgd", "lr": lr, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    free = run(tiny(articles_data, budget={"steps": 1}, optimizer=sgd,
                    train={"grad_clip": None}), "free")
    clipped = run(tiny(articles_data, budget={"steps": 1}, optimizer=sgd,
                       train={"grad_clip": 0.05}), "clipped")
    g = free.at("grad_norm", 1)
    assert clipped.at("grad_norm", 1) == pytest.approx(g, rel=1e-6) and g > 0.5  # pre-clip

    def update_norm(r: Run) -> float:
        return math.sqrt(sum(d.pow(2).sum().item() for d in r.delta().values()))

    assert update_norm(free) == pytest.approx(lr * g, rel=1e-3)
    assert update_norm(clipped) == pytest.approx(lr * 0.05, rel=1e-3)


@pytest.mark.parametrize("schedule", [
    {"name": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.25},
    {"name": "linear", "warmup_steps": 3, "min_lr_ratio": 0.0},
    {"name": "wsd", "warmup_frac": 0.1, "min_lr_ratio": 0.1, "decay_frac": 0.3},
])
def test_warmup_shape_and_min_lr_floor_in_the_lr_rows(run, articles_data, schedule: dict) -> None:
    lr, steps = 1e-2, 30
    cfg = tiny(articles_data, budget={"steps": steps}, optimizer={"lr": lr}, schedule=schedule)
    r = run(cfg)
    rows = r.values("lr")
    fn = build_schedule(cfg.schedule)
    # Row of step s = the lr step s was taken with, i.e. the schedule at (s - 1).
    assert rows == pytest.approx([lr * fn(s, s / steps) for s in range(steps)], rel=1e-12)
    floor = schedule["min_lr_ratio"] * lr
    peak = rows.index(max(rows))
    assert max(rows) == pytest.approx(lr)
    assert min(rows[peak:]) >= floor - 1e-12  # the decay never goes below min_lr_ratio * lr
    # ... and the run ends just above it (the floor itself is the lr at progress 1, after the end).
    assert floor <= rows[-1] == min(rows[peak:]) < floor + 0.12 * (lr - floor)
    assert rows[:peak + 1] == sorted(rows[:peak + 1])  # warmup climbs ...
    assert rows[peak:] == sorted(rows[peak:], reverse=True)  # ... then the shape decays
    if "warmup_steps" in schedule:
        w = schedule["warmup_steps"]
        assert rows[:w] == pytest.approx([lr * (s + 1) / (w + 1) for s in range(w)])
    if schedule["name"] == "wsd":  # stable at the peak until the last decay_frac of the run
        assert rows[3:21] == pytest.approx([lr] * 18)


def test_weight_decay_shrinks_decayed_groups_only(run, articles_data) -> None:
    """One SGD step (no momentum, no clip): the decay run differs from the no-decay run by exactly
    -lr*wd*theta on matrices and the head, and not at all on embeddings, norms and biases."""
    lr, wd = 0.1, 0.5
    sgd = {"name": "sgd", "lr": lr, "momentum": 0.0, "nesterov": False}
    common = {"budget": {"steps": 1}, "train": {"grad_clip": None},
              "model": {"tie_embeddings": False}}
    off = run(tiny(articles_data, **common, optimizer={**sgd, "weight_decay": 0.0}), "off")
    on = run(tiny(articles_data, **common, optimizer={**sgd, "weight_decay": wd}), "on")
    kinds = on.model.param_kinds()
    assert {"matrix", "head", "embedding", "norm", "bias"} <= set(kinds.values())
    final_off = dict(off.model.named_parameters())
    for n, p in on.model.named_parameters():
        diff = (p - final_off[n]).detach()
        if kinds[n] in ("matrix", "head"):
            torch.testing.assert_close(diff, -lr * wd * on.initial[n], rtol=1e-3, atol=1e-7)
        else:
            assert torch.equal(diff, torch.zeros_like(diff)), n


def test_dropout_is_on_in_training_and_off_in_evaluation(run, articles_data) -> None:
    common = {"budget": {"steps": 2}}
    off = run(tiny(articles_data, **common), "off")
    on = run(tiny(articles_data, **common, model={"dropout": 0.3}), "on")
    assert on.at("val_loss", 0) == off.at("val_loss", 0)  # same init; eval has no dropout
    assert on.at("train_loss", 1) != pytest.approx(off.at("train_loss", 1), rel=1e-4)
    assert on.values("val_loss")[-1] != off.values("val_loss")[-1]


# -- starting from pretrained GPT-2 weights ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                                     vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(path)
    return path, hf


def test_init_from_loads_saved_gpt2_weights(run, articles_data, tiny_gpt2_dir, data_dir) -> None:
    path, hf = tiny_gpt2_dir
    cfg = tiny(articles_data, tokenizer={"kind": "gpt2"}, budget={"steps": 1},
               model={"dropout": 0.1},
               train={"init_from": str(path), "seq_len": 64, "batch_size": 4},
               evaluation={"max_batches": 2, "batch_size": 4})
    data = prepare_data(cfg.data, cfg.tokenizer)
    assert data.tokenizer.vocab_size == 50257
    r = run(cfg, data=data)
    assert r.result.status == "completed"

    # The weights the loop started from are the saved ones (HF Conv1D stores [in, out]).
    sd = hf.state_dict()
    w = r.initial
    assert torch.equal(w["tok_emb.weight"], sd["transformer.wte.weight"])
    assert torch.equal(w["pos_emb.weight"], sd["transformer.wpe.weight"])
    assert torch.equal(w["blocks.0.attn.qkv.weight"], sd["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(w["blocks.0.mlp.proj.bias"], sd["transformer.h.0.mlp.c_proj.bias"])
    assert r.model.cfg.dropout == 0.1  # the spec's runtime knobs reach the pretrained model

    # Step-0 validation loss is what transformers computes on the same windows.
    nll, n = 0.0, 0
    with torch.no_grad():
        for x, y in iter_eval_batches(data.splits["valid"], 64, 4, max_batches=2):
            logits = hf(x).logits
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    assert r.at("val_loss", 0) == pytest.approx(nll / n, rel=1e-5)

    # The preflight (Overfit Sanity) starts from the same pretrained weights, not a random model.
    pre = overfit(preflight_config(cfg), data, sequences=2, batch_size=2, steps=1,
                  loss_threshold=0.5)
    window = torch.from_numpy(data.splits["train"][:2 * 64 + 1].astype("int64"))
    with torch.no_grad():
        logits = hf(window[:-1].view(2, 64)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), window[1:].view(2, 64).flatten()).item()
    assert pre.initial_loss == pytest.approx(expected, rel=1e-5)


def test_init_from_user_errors(run, articles_data, tiny_gpt2_dir) -> None:
    path, _ = tiny_gpt2_dir
    with pytest.raises(UserError, match=r"tokenizer\.kind: gpt2"):
        run(tiny(articles_data, train={"init_from": str(path)}), "bytes")
    cfg = tiny(articles_data, tokenizer={"kind": "gpt2"},
               train={"init_from": str(path), "seq_len": 128})
    with pytest.raises(UserError, match="64 positions"):
        run(cfg, "long", data=prepare_data(cfg.data, cfg.tokenizer))
