"""Optimizers, parameter grouping and lr schedules (lmlab.optim)."""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import OptimizerConfig, ScheduleConfig
from lmlab.errors import UserError
from lmlab.optim import (
    Lion,
    Muon,
    build_optimizer,
    build_param_groups,
    build_schedule,
    classify_params,
    newton_schulz,
    optimizer_state_bytes,
    set_lr,
)
from lmlab.optim.optimizers import _fused_devices

VOCAB = 32


class TinyNet(nn.Module):
    """Embedding + 2-layer MLP + head: one parameter of every kind the grouping knows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.fc1(self.embed(idx))))
        return self.lm_head(h + F.gelu(self.fc2(h)))


# A fixed random permutation of the vocabulary to learn: every token maps to another.
INPUTS = torch.arange(VOCAB)
TARGETS = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))

GENERIC_KINDS = {
    "embed.weight": "embedding",
    "fc1.weight": "matrix",
    "fc1.bias": "bias",
    "norm.weight": "norm",
    "norm.bias": "norm",
    "fc2.weight": "matrix",
    "fc2.bias": "bias",
    "lm_head.weight": "head",
}

# One config per optimizer (and per AdamW implementation), each with an lr that suits it.
CONFIGS = {
    "adamw-auto": OptimizerConfig(name="adamw", lr=1e-2),
    "adamw-fused": OptimizerConfig(name="adamw", lr=1e-2, impl="fused"),
    "adamw-foreach": OptimizerConfig(name="adamw", lr=1e-2, impl="foreach"),
    "adamw-plain": OptimizerConfig(name="adamw", lr=1e-2, impl="plain"),
    "sgd": OptimizerConfig(name="sgd", lr=0.3),
    "lion": OptimizerConfig(name="lion", lr=3e-3),
    "muon": OptimizerConfig(name="muon", lr=1e-2, muon_lr=0.05),
    "adafactor": OptimizerConfig(name="adafactor", lr=1e-2),
}


def make_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def loss_of(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(INPUTS), TARGETS)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()


def group_of(opt: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


# --- Muon ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_makes_singular_values_near_one(shape: tuple[int, int]) -> None:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    before = torch.linalg.svdvals(G)
    assert before.max() / before.min() > 3  # a real spread for the iteration to remove

    X = newton_schulz(G, steps=5)

    assert X.shape == G.shape and X.dtype == G.dtype
    sv = torch.linalg.svdvals(X)
    # The tuned quintic does not converge to exactly 1: its fixed band is about [0.68, 1.13]
    # (the reference describes it as S' ~ Uniform(0.5, 1.5)).
    assert sv.min() > 0.6 and sv.max() < 1.2
    # It keeps the singular vectors: X is (close to) U·Vᵀ of G, not just any orthogonal matrix.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert F.cosine_similarity((U @ Vh).flatten(), X.flatten(), dim=0) > 0.95


def test_newton_schulz_more_steps_is_closer_to_orthogonal() -> None:
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    spread = [torch.linalg.svdvals(newton_schulz(G, s)).min().item() for s in (1, 2, 5)]
    assert spread[0] < spread[1] < spread[2]


def test_muon_step_applies_scaled_orthogonalised_update() -> None:
    cfg = OptimizerConfig(name="muon", muon_lr=0.05, weight_decay=0.0)
    net = make_net()
    opt = build_optimizer(cfg, net)
    assert isinstance(opt, Muon)
    gen = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()

    for name in ("fc1.weight", "fc2.weight"):
        p = dict(net.named_parameters())[name]
        delta = (before[name] - p.detach()) / cfg.muon_lr
        rows, cols = p.shape
        scale = math.sqrt(max(1.0, rows / cols))
        # On the first step the (Nesterov) momentum is a multiple of the gradient, and the
        # orthogonalisation is scale-free, so the update is exactly scale·NS(grad).
        torch.testing.assert_close(delta, scale * newton_schulz(grads[name], 5),
                                   atol=1e-5, rtol=1e-4)
    # fc1 (64×16) is tall and well-conditioned: its update, unscaled, has singular values near 1.
    sv = torch.linalg.svdvals((before["fc1.weight"] - net.fc1.weight.detach()) / (cfg.muon_lr * 2))
    assert sv.min() > 0.6 and sv.max() < 1.2
    assert torch.equal(net.fc1.weight.grad, grads["fc1.weight"])  # the gradient is left as is


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_second_step_uses_momentum(nesterov: bool) -> None:
    beta, lr = 0.9, 0.05
    w = nn.Parameter(torch.zeros(8, 24))
    opt = Muon([{"params": [w], "use_muon": True}], lr=lr, momentum=beta, nesterov=nesterov)
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(8, 24, generator=gen), torch.randn(8, 24, generator=gen)
    w.grad = g1
    opt.step()
    before = w.detach().clone()
    w.grad = g2
    opt.step()

    momentum = beta * (1 - beta) * g1 + (1 - beta) * g2  # EMA momentum after two gradients
    direction = (1 - beta) * g2 + beta * momentum if nesterov else momentum
    # 8×24 is wide, so no extra scale.
    torch.testing.assert_close(before - w.detach(), lr * newton_schulz(direction, 5),
                               atol=1e-6, rtol=1e-4)


def test_muon_non_matrix_params_follow_adamw() -> None:
    # Same hyperparameters, same synthetic gradients: Muon's AdamW part must match torch.AdamW.
    muon_cfg = OptimizerConfig(name="muon", lr=1e-2, weight_decay=0.1, decay_embeddings=True,
                               embedding_lr_mult=2.0, head_lr_mult=0.5)
    adamw_cfg = muon_cfg.model_copy(update={"name": "adamw", "impl": "plain"})
    net_a, net_b = make_net(), make_net()
    opt_a, opt_b = build_optimizer(muon_cfg, net_a), build_optimizer(adamw_cfg, net_b)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()

    kinds = classify_params(net_a)
    params_b = dict(net_b.named_parameters())
    for name, pa in net_a.named_parameters():
        if kinds[name] == "matrix":
            assert not torch.allclose(pa, params_b[name])  # Muon really is different there
        else:
            torch.testing.assert_close(pa, params_b[name], atol=1e-6, rtol=1e-5)


def test_muon_rejects_vectors_in_muon_groups() -> None:
    with pytest.raises(ValueError, match="matrices"):
        Muon([{"params": [nn.Parameter(torch.zeros(4))], "use_muon": True}])


def test_lion_update_is_signed_interpolation_with_decoupled_decay() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.2])
    opt.step()
    # m = 0: the step is sign(g); decay shrinks by lr·wd = 5% first.
    torch.testing.assert_close(p.detach(), torch.tensor([0.95 - 0.1, -1.9 + 0.1]))
    # Now m = 0.01·g1 = [0.003, -0.002]. For the first coordinate 0.9·0.003 + 0.1·(-0.1) < 0,
    # although m itself is positive (and would still be, had it been tracked with β1).
    p.grad = torch.tensor([-0.1, -0.5])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.85 * 0.95 + 0.1, -1.8 * 0.95 + 0.1]))
    torch.testing.assert_close(opt.state[p]["exp_avg"],
                               0.99 * torch.tensor([0.003, -0.002]) + 0.01 * p.grad)


# --- every optimizer: learns, and resumes exactly ---------------------------------------------


@pytest.mark.parametrize("key", list(CONFIGS))
def test_optimizer_reduces_loss(key: str) -> None:
    net = make_net()
    opt = build_optimizer(CONFIGS[key], net)
    with torch.no_grad():
        initial = loss_of(net).item()
    train(net, opt, 50)
    with torch.no_grad():
        final = loss_of(net).item()
    assert final < 0.5 * initial, f"{key}: {initial:.3f} -> {final:.3f}"


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_dict_round_trip_resumes_exactly(key: str) -> None:
    cfg = CONFIGS[key]
    net_a = make_net()
    opt_a = build_optimizer(cfg, net_a)
    set_lr(opt_a, 0.7)  # a schedule has moved the lr: that must survive the round trip too
    train(net_a, opt_a, 10)

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    net_b = copy.deepcopy(net_a)
    opt_b = build_optimizer(cfg, net_b)
    opt_b.load_state_dict(torch.load(buffer))
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]

    # A control that skips the load must drift away, or the comparison below proves nothing.
    net_c = copy.deepcopy(net_a)
    opt_c = build_optimizer(cfg, net_c)
    set_lr(opt_c, 0.7)
    for net, opt in ((net_a, opt_a), (net_b, opt_b), (net_c, opt_c)):
        train(net, opt, 5)
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters(), strict=True):
        assert torch.equal(pa, pb), f"{key}: {name} differs after resuming"
    assert any(not torch.equal(pa, pc) for pa, pc in zip(net_a.parameters(), net_c.parameters(),
                                                          strict=True))


# --- implementation choice and configuration errors -------------------------------------------


def test_adamw_impl_is_recorded_and_applied() -> None:
    auto = build_optimizer(OptimizerConfig(name="adamw"), make_net())
    assert auto.lmlab_impl == ("fused" if "cpu" in _fused_devices() else "foreach")
    plain = build_optimizer(OptimizerConfig(name="adamw", impl="plain"), make_net())
    assert plain.lmlab_impl == "plain" and plain.defaults["foreach"] is False
    foreach = build_optimizer(OptimizerConfig(name="adamw", impl="foreach"), make_net())
    assert foreach.lmlab_impl == "foreach" and foreach.defaults["foreach"] is True
    if "cpu" in _fused_devices():
        fused = build_optimizer(OptimizerConfig(name="adamw", impl="fused"), make_net())
        assert fused.lmlab_impl == "fused" and fused.defaults["fused"] is True
    assert build_optimizer(OptimizerConfig(name="lion"), make_net()).lmlab_impl == "plain"
    assert build_optimizer(OptimizerConfig(name="adafactor"), make_net()).lmlab_impl == "foreach"


@pytest.mark.parametrize(("fields", "device", "bad_field"), [
    ({"name": "sgd", "momentum": 0.0, "nesterov": True}, "cpu", "optimizer.nesterov"),
    ({"name": "muon", "momentum": 0.0, "nesterov": True}, "cpu", "optimizer.nesterov"),
    ({"name": "lion", "impl": "fused"}, "cpu", "optimizer.impl"),
    ({"name": "muon", "impl": "foreach"}, "cpu", "optimizer.impl"),
    ({"name": "adafactor", "impl": "fused"}, "cpu", "optimizer.impl"),
    ({"name": "adamw", "impl": "fused"}, "no-such-device", "optimizer.impl"),
])
def test_impossible_combinations_are_user_errors(fields: dict, device: str, bad_field: str) -> None:
    with pytest.raises(UserError) as info:
        build_optimizer(OptimizerConfig(**fields), make_net(), device_type=device)
    assert info.value.field == bad_field


def test_sgd_without_momentum_or_nesterov_is_fine() -> None:
    opt = build_optimizer(OptimizerConfig(name="sgd", momentum=0.0, nesterov=False), make_net())
    assert opt.defaults["momentum"] == 0.0 and opt.defaults["nesterov"] is False


# --- parameter grouping -----------------------------------------------------------------------


def test_classify_params_generic_rules() -> None:
    assert classify_params(make_net()) == GENERIC_KINDS


def test_classify_params_tied_head_is_the_embedding() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.lm_head = nn.Linear(16, VOCAB, bias=False)
            self.lm_head.weight = self.embed.weight

    assert classify_params(Tied()) == {"embed.weight": "embedding"}


def test_classify_params_recognises_hand_written_norms() -> None:
    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(dim))

    model = nn.Sequential(nn.Linear(4, 4), RMSNorm(4))
    assert classify_params(model) == {"0.weight": "matrix", "0.bias": "bias", "1.gain": "norm"}


def test_classify_params_prefers_param_kinds() -> None:
    class WithKinds(TinyNet):
        def param_kinds(self) -> dict[str, str]:
            # Deliberately unlike the generic rules: fc2 is declared the head.
            return {**GENERIC_KINDS, "fc2.weight": "head", "lm_head.weight": "matrix"}

    kinds = classify_params(WithKinds())
    assert kinds["fc2.weight"] == "head" and kinds["lm_head.weight"] == "matrix"

    class Incomplete(TinyNet):
        def param_kinds(self) -> dict[str, str]:
            return {"embed.weight": "embedding"}

    with pytest.raises(ValueError, match="missing"):
        classify_params(Incomplete())


def test_weight_decay_and_lr_multipliers_land_on_the_right_params() -> None:
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, embedding_lr_mult=3.0,
                          head_lr_mult=0.5)
    net = make_net()
    opt = build_optimizer(cfg, net)
    expected_wd = {"matrix": 0.1, "head": 0.1, "embedding": 0.0, "norm": 0.0, "bias": 0.0}
    expected_lr = {"matrix": 1e-3, "head": 5e-4, "embedding": 3e-3, "norm": 1e-3, "bias": 1e-3}
    for name, p in net.named_parameters():
        group = group_of(opt, p)
        kind = GENERIC_KINDS[name]
        assert group["kind"] == kind
        assert group["weight_decay"] == expected_wd[kind], name
        assert group["lr"] == pytest.approx(expected_lr[kind]), name

    both = cfg.model_copy(update={"decay_norms_and_biases": True, "decay_embeddings": True})
    assert all(g["weight_decay"] == 0.1 for g in build_param_groups(both, make_net()))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_weight_decay_really_shrinks_only_decayed_params(key: str) -> None:
    # With zero gradients the only move left is the decay (sign(0) = 0 for Lion, NS(0) = 0 for
    # Muon; for SGD's L2 term, without Nesterov, the first step is the same lr·wd·θ): decayed
    # params shrink by lr·wd at their group's lr (muon_lr for Muon's matrices), the rest stay put.
    cfg = CONFIGS[key].model_copy(update={"weight_decay": 0.5, "nesterov": False})
    net = make_net()
    opt = build_optimizer(cfg, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        if GENERIC_KINDS[name] in ("matrix", "head"):
            shrink = 1 - group_of(opt, p)["lr"] * 0.5
            torch.testing.assert_close(p.detach(), before[name] * shrink)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_frozen_params_are_left_out() -> None:
    net = make_net()
    net.embed.weight.requires_grad_(False)
    groups = build_param_groups(OptimizerConfig(), net)
    assert [g["kind"] for g in groups] == ["matrix", "head", "norm", "bias"]
    assert sum(len(g["params"]) for g in groups) == len(GENERIC_KINDS) - 1


def test_set_lr_applies_multipliers_and_muon_base() -> None:
    cfg = OptimizerConfig(name="muon", lr=1e-3, muon_lr=0.02, embedding_lr_mult=4.0,
                          head_lr_mult=0.25)
    opt = build_optimizer(cfg, make_net())
    set_lr(opt, 0.5)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert {g["kind"]: g["use_muon"] for g in opt.param_groups} == {
        "matrix": True, "head": False, "embedding": False, "norm": False, "bias": False}
    assert lrs == pytest.approx({"matrix": 0.01, "head": 1.25e-4, "embedding": 2e-3,
                                 "norm": 5e-4, "bias": 5e-4})
    set_lr(opt, 1.0)
    assert {g["kind"]: g["lr"] for g in opt.param_groups}["matrix"] == pytest.approx(0.02)


# --- optimizer state memory -------------------------------------------------------------------


def test_optimizer_state_bytes() -> None:
    def after_one_step(cfg: OptimizerConfig) -> tuple[int, int, int]:
        net = make_net()
        opt = build_optimizer(cfg, net)
        assert optimizer_state_bytes(opt) == 0  # state is created lazily, on the first step
        train(net, opt, 1)
        param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        matrix_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                           if GENERIC_KINDS[n] == "matrix")
        return optimizer_state_bytes(opt), param_bytes, matrix_bytes

    n_tensors = len(GENERIC_KINDS)
    used, params, _ = after_one_step(OptimizerConfig(name="adamw", impl="plain"))
    # Two moments per parameter plus a 4-byte step counter per tensor.
    assert 2 * params <= used <= 2 * params + 8 * n_tensors
    used, params, _ = after_one_step(OptimizerConfig(name="sgd"))
    assert used == params
    used, params, _ = after_one_step(OptimizerConfig(name="lion"))
    assert used == params
    used, params, matrices = after_one_step(OptimizerConfig(name="muon"))
    assert used == matrices + 2 * (params - matrices)  # momentum on matrices, Adam on the rest


# --- schedules --------------------------------------------------------------------------------


def run_schedule(cfg: ScheduleConfig, total: int = 200) -> list[float]:
    schedule = build_schedule(cfg)
    return [schedule(step, step / total) for step in range(total + 1)]


def test_warmup_steps_is_linear_from_one_over_w_plus_one() -> None:
    s = build_schedule(ScheduleConfig(name="constant", warmup_steps=9))
    assert s(0, 0.0) == pytest.approx(0.1)
    assert s(4, 0.04) == pytest.approx(0.5)
    assert s(8, 0.08) == pytest.approx(0.9)
    assert s(9, 0.09) == 1.0
    assert s(150, 0.75) == 1.0


def test_cosine_values() -> None:
    s = build_schedule(ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1))
    # Run of 100 steps: warmup ends at progress 0.1, so the decay's midpoint is progress 0.55.
    assert s(0, 0.0) == pytest.approx(1 / 11)
    assert s(10, 0.10) == pytest.approx(1.0)
    assert s(55, 0.55) == pytest.approx(0.55)
    assert s(100, 1.0) == pytest.approx(0.1)
    # The decay starts at the peak whatever progress the warmup took (here a token budget).
    assert s(10, 0.3) == pytest.approx(1.0)

    no_warmup = build_schedule(ScheduleConfig(name="cosine", min_lr_ratio=0.0))
    assert no_warmup(0, 0.0) == 1.0
    assert no_warmup(25, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert no_warmup(50, 0.5) == pytest.approx(0.5)
    assert no_warmup(100, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_linear_values() -> None:
    s = build_schedule(ScheduleConfig(name="linear", min_lr_ratio=0.2))
    assert s(0, 0.0) == 1.0
    assert s(50, 0.5) == pytest.approx(0.6)
    assert s(75, 0.75) == pytest.approx(0.4)
    assert s(100, 1.0) == pytest.approx(0.2)


def test_wsd_is_stable_then_decays_over_the_last_fraction() -> None:
    s = build_schedule(ScheduleConfig(name="wsd", warmup_steps=5, decay_frac=0.2,
                                      min_lr_ratio=0.0))
    assert s(2, 0.02) == pytest.approx(0.5)
    assert s(5, 0.05) == 1.0
    assert s(50, 0.5) == 1.0
    assert s(80, 0.8) == 1.0
    assert s(90, 0.9) == pytest.approx(0.5)
    assert s(100, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_inverse_sqrt_values() -> None:
    s = build_schedule(ScheduleConfig(name="inverse_sqrt", warmup_steps=4, min_lr_ratio=0.1))
    assert s(3, 0.0) == pytest.approx(0.8)
    assert s(4, 0.0) == 1.0
    assert s(16, 0.0) == pytest.approx(0.5)
    assert s(64, 0.0) == pytest.approx(0.25)
    assert s(10_000, 1.0) == pytest.approx(0.1)  # 0.02 unfloored

    no_warmup = build_schedule(ScheduleConfig(name="inverse_sqrt", min_lr_ratio=0.0))
    assert no_warmup(0, 0.0) == 1.0
    assert no_warmup(4, 0.0) == pytest.approx(0.5)


def test_warmup_frac_wins_over_warmup_steps() -> None:
    s = build_schedule(ScheduleConfig(name="cosine", warmup_steps=1000, warmup_frac=0.1,
                                      min_lr_ratio=0.0))
    assert s(0, 0.0) == 0.0
    assert s(5, 0.05) == pytest.approx(0.5)
    assert s(10, 0.1) == pytest.approx(1.0)
    assert s(55, 0.55) == pytest.approx(0.5)  # the decay spans progress 0.1 .. 1
    assert s(100, 1.0) == pytest.approx(0.0, abs=1e-12)

    inv = build_schedule(ScheduleConfig(name="inverse_sqrt", warmup_frac=0.1, min_lr_ratio=0.0))
    assert inv(99, 0.4) == pytest.approx(0.5)

    # warmup_frac == 0 means no warmup at all, even with warmup_steps set.
    none = build_schedule(ScheduleConfig(name="inverse_sqrt", warmup_steps=100, warmup_frac=0.0))
    assert none(0, 0.0) == 1.0
    assert none(4, 0.02) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "wsd", "inverse_sqrt"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 20}, {"warmup_frac": 0.05}])
def test_schedules_are_monotone_and_respect_the_floor(name: str, warmup: dict) -> None:
    cfg = ScheduleConfig(name=name, min_lr_ratio=0.3, **warmup)
    values = run_schedule(cfg)
    peak = values.index(max(values))
    assert values[peak] == pytest.approx(1.0)
    ramp, after = values[: peak + 1], values[peak:]
    assert all(a < b for a, b in itertools.pairwise(ramp))
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert all(0.3 - 1e-12 <= v <= 1.0 for v in after)
    if name == "constant":
        assert after == [1.0] * len(after)
    elif name != "inverse_sqrt":  # inverse_sqrt reaches its floor only when 1/sqrt(t) does
        assert after[-1] == pytest.approx(0.3)


def test_schedule_is_pure_and_picklable() -> None:
    s = build_schedule(ScheduleConfig(name="cosine", warmup_steps=3))
    again = pickle.loads(pickle.dumps(s))
    assert [s(i, i / 10) for i in range(11)] == [again(i, i / 10) for i in range(11)]
    assert s(7, 0.7) == s(7, 0.7)
