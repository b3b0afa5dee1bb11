"""Packed runs: the stacked model computes each member as its own GPT would, members follow
their solo runs, a non-finite member stops alone, a killed pack resumes to the rows of an
uninterrupted one, and the planner packs only what may be packed.

Tolerance (fp32 on CPU): a packed member's batched kernels reduce in another order than its solo
run's, so the curves are not bit-identical, and training amplifies the rounding (most at a high
lr). Stated and tested over 60 steps, for seeds, an lr-only arm and a dropout member: every
train, validation and test loss (and the perplexities and bits per byte derived from them)
within 1e-4 relative of the solo run's, the global gradient norm within 1e-3, the probe
diagnostics (per-block and per-tensor gradient norms, update ratios, activation RMS, attention
entropy: small quantities, some of them norms of tiny gradients) within 1e-2; with identical
steps, row names, events and statuses. Measured: losses within 4e-6, the global gradient norm
within 2e-4, diagnostics within 3e-3 (the lr 1e-2 arm; seeds at lr 3e-3 within 1e-5).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import ModelConfig, RunConfig
from lmlab.errors import UserError
from lmlab.execute.pack import (
    CPU_PACK_MAX_STEP_FLOPS,
    auto_note,
    auto_size,
    member_bytes,
    parse_pack,
    plan_packs,
    step_flops,
)
from lmlab.identity import digest
from lmlab.model import build_model
from lmlab.model.stacked import StackedGPT
from lmlab.spec.baseline import deep_merge
from lmlab.spec.expand import expand
from lmlab.spec.load import load_yaml
from lmlab.spec.schema import Spec
from lmlab.store import Store
from lmlab.train import loss as loss_module
from lmlab.train.loop import train
from lmlab.train.pack import Member, train_pack, unpackable
from test_spec import base_spec

LOSS_RTOL, GRAD_RTOL, PROBE_RTOL = 1e-4, 1e-3, 1e-2
TIMING = {"step_time_s", "tokens_per_s", "peak_mem_bytes"}


# -- the stacked model ----------------------------------------------------------------------------

KNOBS = [
    {},
    {"norm": "rmsnorm", "positions": "rope", "activation": "swiglu", "bias": False},
    {"norm_position": "post", "tie_embeddings": False, "attention": "manual"},
]


def members(cfg: ModelConfig, n: int = 3, vocab: int = 61, seq: int = 12) -> list:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model(cfg, vocab, seq))
    return out


@pytest.mark.parametrize("knobs", KNOBS, ids=["gpt2", "llama-like", "post-untied-manual"])
def test_the_stacked_model_computes_each_member_as_its_own_model(knobs: dict) -> None:
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, **knobs)
    models = members(cfg)
    solo = [[(n, p.detach().clone()) for n, p in m.named_parameters()] for m in models]
    x = torch.randint(0, 61, (3, 4, 12))
    # Each member's own forward and gradients, before stacking.
    want, grads = [], []
    probe = torch.randn(4, 12, 16)
    for i, m in enumerate(models):
        h = m.hidden(x[i])
        (h * probe).sum().backward()
        want.append(h.detach())
        # (an untied head has no gradient here: hidden() stops before it)
        grads.append({n: None if p.grad is None else p.grad.clone()
                      for n, p in m.named_parameters()})
        m.zero_grad()
    stack = StackedGPT(models)
    # The members' parameters are now views into the stacks, with their values unchanged.
    for m, before in zip(models, solo, strict=True):
        for (name, value), (_, p) in zip(before, m.named_parameters(), strict=True):
            assert torch.equal(p.detach(), value), name
    got = stack.hidden(x)
    assert got.shape == (3, 4, 12, 16)
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
    (got * probe).sum().backward()
    stack.member_grads()
    for m, g in zip(models, grads, strict=True):
        for name, p in m.named_parameters():
            if g[name] is None:
                assert p.grad is None, name
                continue
            torch.testing.assert_close(p.grad, g[name], rtol=1e-4, atol=1e-6, msg=name)
    # Norms: each member's global gradient norm, as get_total_norm computes it.
    norms = stack.grad_norms()
    for m, norm in zip(models, norms, strict=True):
        ref = torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None])
        torch.testing.assert_close(norm, ref, rtol=1e-5, atol=0)
    # An update through a member's view is an update of the stack, and the other way round.
    with torch.no_grad():
        models[1].tok_emb.weight.add_(1.0)
    assert torch.equal(stack.weights["tok_emb.weight"][1], models[1].tok_emb.weight)
    assert torch.equal(stack.head[1], models[1].lm_head.weight)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_each_member_draws_its_solo_runs_dropout_masks_from_its_own_generator(
        attention: str) -> None:
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, dropout=0.25, attention=attention)
    models = members(cfg, n=2)
    x = torch.randint(0, 61, (2, 3, 12))
    # A solo run draws dropout from the global RNG, seeded by its seed before its model is built.
    want, states = [], []
    for seed, m in enumerate(models):
        torch.manual_seed(seed)
        build_model(cfg, 61, 12)  # the draws of the solo run's init
        states.append(torch.get_rng_state())
        want.append(m.hidden(x[seed]).detach())
    gens = []
    for state in states:
        g = torch.Generator()
        g.set_state(state)
        gens.append(g)
    torch.manual_seed(1234)  # the global RNG plays no part in a pack's masks
    got = StackedGPT(models, gens).hidden(x)
    for i in range(2):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
    other = StackedGPT(members(cfg, n=2), [torch.Generator().manual_seed(7)] * 2).hidden(x)
    assert not torch.allclose(other[0], want[0])  # the masks really are drawn


def test_models_of_different_shapes_do_not_stack() -> None:
    a = build_model(ModelConfig(n_layer=2, n_head=2, d_model=16), 61, 12)
    b = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32), 61, 12)
    with pytest.raises(ValueError, match="cannot stack"):
        StackedGPT([a, b])


# -- the fused loss ------------------------------------------------------------------------------


def test_the_fused_loss_equals_cross_entropy_with_smoothing_and_z_loss(monkeypatch) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 300)  # several chunks per member
    torch.manual_seed(0)
    h = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 37))
    eps, lam = (0.0, 0.1, 0.2), (0.0, 1e-3, 0.0)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ce, objective = loss_module.linear_cross_entropy(h, w, y, eps, lam)
    (objective * scale).sum().backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref_ce, ref_obj = [], []
    for i in range(3):
        logits = h[i] @ w[i].t()
        ref_ce.append(torch.nn.functional.cross_entropy(logits, y[i]))
        ref_obj.append(torch.nn.functional.cross_entropy(logits, y[i], label_smoothing=eps[i])
                       + lam[i] * torch.logsumexp(logits, -1).square().mean())
    (torch.stack(ref_obj) * scale).sum().backward()
    torch.testing.assert_close(ce, torch.stack(ref_ce), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(objective, torch.stack(ref_obj), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-10, atol=1e-12)


# -- packed runs against solo runs -----------------------------------------------------------------


def tiny(data: dict, **sections: dict) -> RunConfig:
    tree = {
        "data": data,
        "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 48},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "train": {"batch_size": 8, "seq_len": 32},
        "budget": {"steps": 60},
        "evaluation": {"every_steps": 20, "max_batches": 4, "test_at_end": True,
                       "diagnostics": {"every_steps": 20}},
        "cadence": {"log_every_steps": 5, "checkpoint_every_steps": 20},
    }
    return RunConfig.model_validate(deep_merge(tree, sections))


def solo(cfgs: dict[str, RunConfig], out: Path) -> Store:
    store = Store.open(out)
    for rid, cfg in cfgs.items():
        store.add_run(rid, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
        train(cfg, rid, store, out / "runs" / rid)
    return store


def packed(cfgs: dict[str, RunConfig], out: Path) -> Store:
    store = Store.open(out)
    for rid, cfg in cfgs.items():
        store.add_run(rid, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    train_pack([Member(rid, cfg, out / "runs" / rid) for rid, cfg in cfgs.items()], store)
    return store


def rows(store: Store, rid: str) -> dict[str, list[tuple[int, int, float]]]:
    return {name: [(r.step, r.tokens, r.value) for r in series]
            for name, series in store.metrics(rid).items() if name not in TIMING}


def assert_follows(got: dict, want: dict) -> None:
    """A packed member's rows against its solo run's, at the stated tolerance."""
    assert sorted(got) == sorted(want)
    for name, series in want.items():
        assert [(s, t) for s, t, _ in got[name]] == [(s, t) for s, t, _ in series], name
        rtol = PROBE_RTOL if "/" in name else GRAD_RTOL if name == "grad_norm" else LOSS_RTOL
        for (_, _, a), (step, _, b) in zip(got[name], series, strict=True):
            if not math.isfinite(b):  # a non-finite step's row: non-finite in both
                assert not math.isfinite(a), (name, step)
                continue
            assert a == pytest.approx(b, rel=rtol, abs=1e-7), (name, step)


@pytest.fixture(scope="module")
def seeds_and_arms(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    articles = {"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
                "name": "wikitext-2-test-articles"}
    cfgs = {"a-s0": tiny(articles), "a-s1": tiny(articles, train={"seed": 1}),
            "fast-s0": tiny(articles, optimizer={"lr": 1e-2}, schedule={"warmup_steps": 0}),
            "drop-s2": tiny(articles, model={"dropout": 0.1}, train={"seed": 2})}
    tmp = tmp_path_factory.mktemp("pack")
    return cfgs, solo(cfgs, tmp / "solo"), packed(cfgs, tmp / "packed")


def test_packed_members_follow_their_solo_runs_for_seeds_and_lr_arms(seeds_and_arms) -> None:
    cfgs, alone, together = seeds_and_arms
    for rid in cfgs:
        assert_follows(rows(together, rid), rows(alone, rid))
        assert [e["kind"] for e in together.events(rid)] == [e["kind"] for e in alone.events(rid)]
        a, b = alone.run(rid), together.run(rid)
        assert a["status"] == b["status"] == "completed"
        assert a["summary"]["steps"] == b["summary"]["steps"] == 60
    # The dropout member draws its solo run's masks: on CPU it follows as closely as the rest.
    assert len(rows(together, "drop-s2")["train_loss"]) == 60


def test_a_packed_run_says_so_and_nothing_else_tells_it_apart(seeds_and_arms) -> None:
    from lmlab.analysis.records import STATUS_KEYS, load_runs, status_row

    cfgs, alone, together = seeds_and_arms
    prov = together.run("a-s1")["provenance"]
    assert prov["packed"] == {"pack": list(cfgs), "members": 4, "index": 1}
    summary = together.run("a-s1")["summary"]
    assert summary["packed_with"] == ["a-s0", "fast-s0", "drop-s2"]
    assert summary["peak_mem_of"] == "pack"
    assert "packed" not in alone.run("a-s1")["provenance"]
    solo_rows = {r.run_id: status_row(r) for r in load_runs(alone)}
    for r in load_runs(together):
        row = status_row(r)
        assert list(row) == list(STATUS_KEYS)
        assert row["final_val_loss"] == pytest.approx(solo_rows[r.run_id]["final_val_loss"],
                                                      rel=LOSS_RTOL)
        assert row["steps"] == solo_rows[r.run_id]["steps"]


def test_a_non_finite_member_is_stopped_alone(tmp_path: Path, articles_data: dict) -> None:
    """With the host check (read every step) and the device-side one (fused AdamW skips the
    update, the flags are read at the log interval), the member that goes non-finite is
    recorded at its step and stopped; the others go on as their solo runs do."""
    def cfgs(check: str) -> dict[str, RunConfig]:
        common = {"budget": {"steps": 30}, "evaluation": {"test_at_end": False},
                  "cadence": {"log_every_steps": 7}}
        return {"ok-s0": tiny(articles_data, **common, train={"nonfinite_check": check}),
                "bad-s0": tiny(articles_data, **common, optimizer={"lr": 1e6, "impl": "fused"},
                               schedule={"name": "constant"}, train={"nonfinite_check": check}),
                "ok-s1": tiny(articles_data, **common, train={"seed": 1,
                                                                "nonfinite_check": check})}

    alone = solo(cfgs("host"), tmp_path / "solo")
    (solo_event,) = alone.events("bad-s0", "nan")
    for check in ("host", "device"):
        together = packed(cfgs(check), tmp_path / check)
        bad = together.run("bad-s0")
        assert bad["status"] == "diverged" and bad["summary"]["nonfinite_check"] == check
        (event,) = together.events("bad-s0", "nan")
        assert event["step"] == solo_event["step"] and event["detail"]["note"].startswith("stop")
        loss = together.metrics("bad-s0", ["train_loss"])["train_loss"]
        assert [r.step for r in loss] == list(range(1, event["step"] + 1))
        assert bad["summary"]["steps"] == event["step"] - 1
        assert_follows(rows(together, "bad-s0"), rows(alone, "bad-s0"))
        for rid in ("ok-s0", "ok-s1"):  # the others went on, unperturbed
            assert together.run(rid)["status"] == "completed"
            assert_follows(rows(together, rid), rows(alone, rid))


def test_an_interrupted_pack_checkpoints_each_member_and_a_member_resumes_solo(
        tmp_path: Path, articles_data: dict) -> None:
    cfgs = {f"i-s{s}": tiny(articles_data, train={"seed": s}, budget={"steps": 30},
                            evaluation={"every_steps": 10}) for s in (0, 1)}
    reference = packed(cfgs, tmp_path / "ref")
    out = tmp_path / "int"
    store = Store.open(out)
    for rid, cfg in cfgs.items():
        store.add_run(rid, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    calls = {"n": 0}

    def stop_after_some_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 13  # between steps 13 and 14: off every cadence

    members = [Member(rid, cfg, out / "runs" / rid) for rid, cfg in cfgs.items()]
    results = train_pack(members, store, should_stop=stop_after_some_steps)
    assert [r.status for r in results] == ["interrupted", "interrupted"]
    for rid in cfgs:
        assert (out / "runs" / rid / "checkpoint.pt").exists()
        assert store.events(rid, "interrupted")[0]["step"] == 13
    # One member resumes solo from its own checkpoint (its dropout stream, data position and
    # optimizer state included), the other packed with nobody: both end as the packed run did.
    train(cfgs["i-s0"], "i-s0", store, out / "runs" / "i-s0")
    train_pack(members[1:], store)
    for rid in cfgs:
        assert store.run(rid)["status"] == "completed"
        assert_follows(rows(store, rid), rows(reference, rid))


def test_members_resumed_at_different_steps_train_as_separate_packs(
        tmp_path: Path, articles_data: dict) -> None:
    cfgs = {f"m-s{s}": tiny(articles_data, train={"seed": s}, budget={"steps": 20},
                            evaluation={"every_steps": 10, "test_at_end": False})
            for s in (0, 1, 2)}
    reference = solo(cfgs, tmp_path / "solo")
    out = tmp_path / "mixed"
    store = Store.open(out)
    for rid, cfg in cfgs.items():
        store.add_run(rid, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    calls = {"n": 0}

    def after_7() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    train(cfgs["m-s1"], "m-s1", store, out / "runs" / "m-s1", should_stop=after_7)
    assert store.run("m-s1")["status"] == "interrupted"
    results = train_pack([Member(rid, cfg, out / "runs" / rid) for rid, cfg in cfgs.items()],
                         store)
    assert [r.status for r in results] == ["completed"] * 3
    assert store.run("m-s1")["provenance"]["packed"]["members"] == 3
    for rid in cfgs:
        assert_follows(rows(store, rid), rows(reference, rid))


def test_the_memory_budget_is_the_packs(tmp_path: Path, articles_data: dict,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.model import stacked

    cfgs = {f"b-s{s}": tiny(articles_data, train={"seed": s}, budget={"steps": 10,
                                                                      "max_memory_mb": 1},
                            evaluation={"test_at_end": False}) for s in (0, 1)}
    over = packed(cfgs, tmp_path / "over")
    for rid in cfgs:
        assert over.run(rid)["status"] == "over_budget"
        (event,) = over.events(rid, "over_budget")
        assert event["step"] == 5 and event["detail"]["peak_mem_of"] == "pack"
        assert event["detail"]["pack"] == list(cfgs)
    # Out of memory in the stacked forward (the 4th training step): every member stops over
    # budget with an oom event and the rows of the steps before.
    hidden, calls = stacked.StackedGPT.hidden, {"n": 0}

    def failing(self: stacked.StackedGPT, idx: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return hidden(self, idx)

    monkeypatch.setattr(stacked.StackedGPT, "hidden", failing)
    roomy = {rid: cfg.model_copy(update={"budget": cfg.budget.model_copy(
        update={"max_memory_mb": None})}) for rid, cfg in cfgs.items()}
    oom = packed(roomy, tmp_path / "oom")
    for rid in cfgs:
        assert oom.run(rid)["status"] == "over_budget"
        (event,) = oom.events(rid, "oom")
        assert event["step"] == 3 and event["detail"]["peak_mem_of"] == "pack"
        assert [r.step for r in oom.metrics(rid, ["train_loss"])["train_loss"]] == [1, 2, 3]


def test_a_killed_pack_resumes_to_exactly_the_rows_of_an_uninterrupted_one(
        tmp_path: Path, articles_data: dict) -> None:
    cfgs = {f"k-s{s}": tiny(articles_data, train={"seed": s}, model={"dropout": 0.1},
                            budget={"steps": 30}, evaluation={"every_steps": 10},
                            cadence={"checkpoint_every_steps": 10}) for s in (0, 1)}

    def start(out: Path) -> list[str]:
        with Store.open(out) as store:
            for rid, cfg in cfgs.items():
                store.add_run(rid, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
        return [sys.executable, "-m", "lmlab.execute.worker", str(out), *cfgs]

    ref = start(tmp_path / "ref")
    subprocess.run(ref, check=True, capture_output=True)
    with Store.open(tmp_path / "ref") as s:
        reference = {rid: rows(s, rid) for rid in cfgs}

    out = tmp_path / "killed"
    cmd = start(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "runs" / "k-s1" / "checkpoint.pt"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        with Store.open(out) as s:
            done = s.metrics("k-s1", ["train_loss"]).get("train_loss", [])
        if ckpt.exists() and done and done[-1].step >= 15:  # past a checkpoint, mid-interval
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store.open(out) as s:
        assert s.run("k-s0")["status"] == "running"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(out) as s:
        for rid in cfgs:
            assert s.run(rid)["status"] == "completed"
            assert [e["kind"] for e in s.events(rid)] == ["resume"]
            assert rows(s, rid) == reference[rid]


# -- the device-side finiteness check, on CPU tensors -------------------------------------------


def test_the_device_side_check_stops_at_the_same_step_with_the_same_rows(
        tmp_path: Path, articles_data: dict) -> None:
    """torch's fused AdamW skips the update on the device (found_inf); the flags are read at
    the log interval. The record equals the host check's: the nan event at the step it
    happened, no row after it, nothing applied from it on."""
    def cfg(check: str) -> RunConfig:
        return tiny(articles_data, optimizer={"lr": 1e6, "impl": "fused"},
                    schedule={"name": "constant"}, train={"nonfinite_check": check},
                    budget={"steps": 30}, cadence={"log_every_steps": 8},
                    evaluation={"every_steps": 100, "test_at_end": False})

    host = solo({"r": cfg("host")}, tmp_path / "host")
    device = solo({"r": cfg("device")}, tmp_path / "device")
    assert device.run("r")["summary"]["nonfinite_check"] == "device"
    assert host.run("r")["summary"]["nonfinite_check"] == "host"
    (h,), (d,) = host.events("r", "nan"), device.events("r", "nan")
    assert d["step"] == h["step"] and d["tokens"] == h["tokens"]
    assert (d["step"] - 1) % 8 != 0 or d["step"] > 1  # found between two reads, not at one
    assert rows(device, "r") == rows(host, "r")
    assert device.run("r")["summary"]["steps"] == d["step"] - 1 == host.run("r")["summary"]["steps"]


def test_a_skipped_step_changes_nothing_and_later_ones_stay_skipped() -> None:
    from lmlab.train.step import apply_update, build_learner

    cfg = RunConfig.model_validate({"tokenizer": {"kind": "byte"},
                                    "model": {"n_layer": 1, "n_head": 1, "d_model": 8},
                                    "optimizer": {"impl": "fused"},
                                    "train": {"nonfinite_check": "device", "ema_decay": 0.5,
                                              "seq_len": 4, "device": "cpu"}})
    learner = build_learner(cfg, 260, torch.device("cpu"))
    before = [p.detach().clone() for p in learner.params]
    ema = [e.clone() for e in learner.ema]

    def step(finite: bool) -> torch.Tensor | None:
        for p in learner.params:
            p.grad = torch.full_like(p, 1.0 if finite else math.nan)
        norm = torch.nn.utils.get_total_norm([p.grad for p in learner.params])
        return apply_update(learner, norm, None, torch.tensor(finite))

    assert step(False).item() == 1.0
    assert step(True).item() == 0.0  # finite, but after a bad step: skipped too (sticky)
    for p, b in zip(learner.params, before, strict=True):
        assert torch.equal(p.detach(), b)
    for e, b in zip(learner.ema, ema, strict=True):
        assert torch.equal(e, b)
    assert all(s["step"].item() == 0 for s in learner.optimizer.state.values())


def test_the_device_side_check_needs_an_optimizer_that_can_skip() -> None:
    from lmlab.train.step import build_learner

    cfg = RunConfig.model_validate({"tokenizer": {"kind": "byte"},
                                    "model": {"n_layer": 1, "n_head": 1, "d_model": 8},
                                    "optimizer": {"name": "lion"},
                                    "train": {"nonfinite_check": "device", "seq_len": 4}})
    with pytest.raises(UserError, match="cannot skip") as e:
        build_learner(cfg, 260, torch.device("cpu"))
    assert e.value.field == "train.nonfinite_check"
    auto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"nonfinite_check": "auto"})})
    assert not build_learner(auto, 260, torch.device("cpu")).device_check  # keeps the host sync


# -- the planner ----------------------------------------------------------------------------------


def plan_of(articles_data: dict, tmp_path: Path, **over: object):
    spec = {**base_spec(articles_data), **over}  # whole sections replaced
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    doc = load_yaml(path)
    return expand(Spec.model_validate(doc.data), doc)


def test_seeds_and_arms_that_change_only_numbers_pack_and_others_do_not(
        tmp_path: Path, articles_data: dict) -> None:
    plan = plan_of(articles_data, tmp_path,
                   meta={"name": "t", "category": "hyperparam", "seeds": [0, 1, 2]})
    assert {digest(r.config, "shape") for r in plan.runs} == {digest(plan.runs[0].config, "shape")}
    packs = plan_packs(plan, "auto")
    assert [len(p.runs) for p in packs] == [6]
    assert [p.run_ids for p in plan_packs(plan, 4)] == [[r.run_id for r in plan.runs[:4]],
                                                       [r.run_id for r in plan.runs[4:]]]
    assert all(not p.packed for p in plan_packs(plan, "off"))
    wide = plan_of(articles_data, tmp_path, independent={
        "variables": ["model.d_model"], "arms": {"slow": {"model.d_model": 32},
                                                 "fast": {"model.d_model": 48}}})
    assert [len(p.runs) for p in plan_packs(wide, "auto")] == [2, 2]  # the seeds of each arm


def test_auto_does_not_pack_what_packing_would_change(tmp_path: Path, articles_data: dict) -> None:
    clock = plan_of(articles_data, tmp_path, comparison_axis="equal_wall_clock",
                    budget={"wall_clock_s": 5}, evaluation={"max_batches": 4})
    assert all(not p.packed for p in plan_packs(clock, "auto"))
    assert "training seconds" in unpackable(clock.runs[0].config)
    memory = plan_of(articles_data, tmp_path, systems_addendum=True,
                     hypothesis={"mechanism": "m", "prediction": "p", "falsification": "f"})
    assert all(not p.packed for p in plan_packs(memory, "auto"))  # its question is memory
    assert any(p.packed for p in plan_packs(memory, 2))  # unless asked for
    cfg = memory.runs[0].config
    tight = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_memory_mb": 1})})
    assert auto_size(tight) == 1
    room = (4 * member_bytes(cfg, 512) + _rss()) / 2**20 + 1
    roomy = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_memory_mb": room})})
    assert auto_size(roomy, 512) in (3, 4)  # the baseline moves a little while we measure


def test_auto_packs_cpu_runs_only_while_packing_pays(tmp_path: Path, articles_data: dict) -> None:
    """On a CPU a pack pays only for steps small enough to be overhead-bound (benchmarks/
    packed.py: 1.27x at 0.13 GFLOP per member step, 1.00x at the quickstart's 5.9): `auto` packs
    the tests' model and leaves the quickstart's shape solo, saying why; `--pack N` still packs."""
    small = plan_of(articles_data, tmp_path)
    assert any(p.packed for p in plan_packs(small, "auto")) and auto_note(small, "auto") is None
    cfg = small.runs[0].config  # 1 x 32, vocab 512, 8 x 32 tokens a step; the head is tied
    per_token = 6 * cfg.model.n_layer * 12 * 32 ** 2 + 12 * 1 * 2 * 16 * 32 + 6 * 512 * 32
    assert step_flops(cfg, 512) == pytest.approx(per_token * 8 * 32, rel=0.05)  # + biases, norms
    controlled = {**base_spec(articles_data)["controlled"],  # examples/quickstart.yaml's shape
                  "tokenizer": {"kind": "bpe", "vocab_size": 4096},
                  "model": {"n_layer": 2, "n_head": 4, "d_model": 128},
                  "train": {"batch_size": 16, "seq_len": 128, "device": "cpu"}}
    big = plan_of(articles_data, tmp_path, controlled=controlled, budget={"tokens": 16 * 128 * 4})
    assert step_flops(big.runs[0].config, 4096) > CPU_PACK_MAX_STEP_FLOPS
    assert all(not p.packed for p in plan_packs(big, "auto", vocab_size=4096))
    note = auto_note(big, "auto", 4096)
    assert note is not None and "GFLOP per run is past where packing pays" in note
    assert any(p.packed for p in plan_packs(big, 2)) and auto_note(big, 2) is None


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_pack_options_are_checked(tmp_path: Path, articles_data: dict) -> None:
    assert parse_pack("auto") == "auto" and parse_pack("1") == "off" and parse_pack(3) == 3
    with pytest.raises(UserError):
        parse_pack("0")
    spec = deep_merge(base_spec(articles_data), {"execution": {"pack": "sometimes"}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "execution.pack" in done.stderr
    assert "Traceback" not in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_spec(articles_data), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(good), "--pack", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--pack" in done.stderr and "Traceback" not in done.stderr


def test_lmlab_run_pack_auto_trains_the_experiment_as_packs(tmp_path: Path,
                                                            articles_data: dict) -> None:
    spec = base_spec(articles_data)
    spec["budget"] = {"tokens": 8 * 32 * 20}
    spec["preflight"]["enabled"] = False
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "exp"
    plan = subprocess.run([sys.executable, "-m", "lmlab.cli", "plan", str(path), "--pack", "auto",
                           "--no-estimate"], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "pack p1: 4 runs as one stacked model" in plan.stdout
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(path), "--out", str(out),
                           "--pack", "auto"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(out) as store:
        runs = store.runs()
        assert {r["status"] for r in runs} == {"completed"} and len(runs) == 4
        assert all(r["provenance"]["packed"]["members"] == 4 for r in runs)
        record = store.get_result("experiment/plan")
        assert [p["runs"] for p in record["packs"]] == [[r["run_id"] for r in runs]]
        assert sum(r["estimate_s"] for r in record["runs"]) == pytest.approx(
            record["packs"][0]["estimate_s"])
    report = subprocess.run([sys.executable, "-m", "lmlab.cli", "report", str(out)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr


def test_mfu_is_logged_against_the_stated_peak(tmp_path: Path, articles_data: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.train.mfu import lookup_peak, matmul_precision

    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert lookup_peak("NVIDIA H100 PCIe", "tf32") == 378e12
    assert lookup_peak("NVIDIA A10G", "bf16") is None  # no datasheet: no MFU, not a guess
    assert lookup_peak("Tesla V100-SXM2-16GB", "bf16") is None
    assert matmul_precision("fp32", True) == "tf32" and matmul_precision("bf16", True) == "bf16"
    monkeypatch.setenv("LMLAB_PEAK_TFLOPS", "0.5")
    cfg = tiny(articles_data, budget={"steps": 10}, evaluation={"test_at_end": False})
    store = solo({"r": cfg}, tmp_path)
    summary = store.run("r")["summary"]
    assert summary["peak_flops"] == 0.5e12 and summary["flops_per_token"] > 0
    mfu = {r.step: r.value for r in store.metrics("r", ["mfu"])["mfu"]}
    tps = {r.step: r.value for r in store.metrics("r", ["tokens_per_s"])["tokens_per_s"]}
    assert set(mfu) == set(tps) == {5, 10}
    for step, value in mfu.items():
        assert value == pytest.approx(tps[step] * summary["flops_per_token"] / 0.5e12)


def test_cpu_runs_keep_freed_memory_for_the_next_step() -> None:
    from lmlab.train.memory import keep_freed_memory

    assert keep_freed_memory(torch.device("cpu")) is sys.platform.startswith("linux")
    assert keep_freed_memory(torch.device("cuda")) is False  # CUDA has its caching allocator


def test_batches_gathered_from_resident_tokens_equal_the_host_ones(articles_data: dict) -> None:
    import numpy as np

    from lmlab.data.batches import TrainBatcher

    tokens = np.arange(5000, dtype=np.uint16) % 311
    host = TrainBatcher(tokens, 3, 32)
    resident = TrainBatcher(tokens, 3, 32)
    resident._resident = torch.from_numpy(tokens.astype(np.int64))  # what .to(cuda) holds
    for start, n, seq in itertools.product((0, 150), (1, 8), (5, 32)):
        for a, b in zip(host.batch(start, n, seq), resident.batch(start, n, seq), strict=True):
            assert torch.equal(a, b)
    assert host.to(torch.device("cpu"))._resident is None  # on CPU the memmap is already there
