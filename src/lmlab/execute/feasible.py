"""Can this machine finish the plan at all? A lower bound on its training time, cheap enough
for ``lmlab validate``.

``lmlab plan`` measures real steps and says how long the runs will take; ``validate`` should not
spend that time, yet a budget a thousand times too large for the machine deserves a word before
anyone waits on it. The bound: training FLOPs (the model's own 6N + attention count, summed
over every run) over the best matmul throughput this device shows in a short probe. Training
never goes faster than its matmuls, so the real time is at least this; a warning only fires
when even the bound is past the limit (a day). Plans too small to matter on any device skip
the probe (and torch's import) altogether.
"""

from __future__ import annotations

import functools
import time

from lmlab.config import RunConfig
from lmlab.spec.advice import Advice
from lmlab.spec.expand import Plan

DAY_S = 86_400.0
# FLOP/s below any device PyTorch trains on (a laptop core does ~50 GFLOP/s of fp32 matmul):
# a plan that fits a day even at this speed needs no probe.
SLOWEST_FLOPS = 1e9
# Token-table sizes by tokenizer kind, as build_tokenizer makes them (bpe: as configured).
NOMINAL_VOCAB = {"gpt2": 50_257, "byte": 256}


def _tokens(cfg: RunConfig) -> int:
    return cfg.budget.tokens or cfg.train.tokens_after(cfg.budget.steps or 0)


def _vocab(cfg: RunConfig) -> int:
    return NOMINAL_VOCAB.get(cfg.tokenizer.kind, cfg.tokenizer.vocab_size)


def flops_ceiling(cfg: RunConfig) -> float:
    """More training FLOPs than the run can need, from the config alone (no torch, no model):
    every matrix at its widest, the token table counted as a matmul, then doubled. Only decides
    whether a plan is small enough to skip the exact count; never reported."""
    m = cfg.model
    d, ff = m.d_model, max(m.d_ff or 0, 4 * m.d_model)
    matrices = m.n_layer * (4 * d * d + 3 * d * ff) + 2 * _vocab(cfg) * d
    return 2 * (6 * matrices + 12 * m.n_layer * d * cfg.train.seq_len) * _tokens(cfg)


@functools.cache
def _flops_per_token(model_json: str, vocab: int, seq_len: int) -> float:
    import torch

    from lmlab.config import ModelConfig
    from lmlab.model import build_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(ModelConfig.model_validate_json(model_json), vocab, seq_len)
    return model.flops_per_token(seq_len)


def training_flops(cfg: RunConfig) -> float:
    """One run's training FLOPs: the model's FLOPs per token times the tokens it is budgeted."""
    per_token = _flops_per_token(cfg.model.model_dump_json(), _vocab(cfg), cfg.train.seq_len)
    return per_token * _tokens(cfg)


def matmul_flops(device: str = "cpu", seconds: float = 0.25) -> float:
    """The best FLOP/s of square fp32 matmuls on ``device`` over about ``seconds``."""
    import torch

    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = 0.0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item(): wait for the device
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def too_long(plan: Plan, limit_s: float = DAY_S, flops_per_s: float | None = None) -> Advice | None:
    """A warning when the plan's runs cannot finish within ``limit_s`` on this machine, run one
    after another; None when they may. ``flops_per_s`` replaces the probe (tests)."""
    if plan.spec.comparison_axis == "equal_wall_clock":  # the time is the budget itself
        total = sum(r.config.budget.wall_clock_s or 0.0 for r in plan.runs)
        if total <= limit_s:
            return None
        return Advice("budget.wall_clock_s", f"{len(plan.runs)} runs of "
                      f"{plan.runs[0].config.budget.wall_clock_s:,g} training seconds need "
                      f"{total / DAY_S:,.1f} days in sequence, evaluation not counted")
    if sum(flops_ceiling(r.config) for r in plan.runs) / SLOWEST_FLOPS <= limit_s:
        return None
    flops = sum(training_flops(r.config) for r in plan.runs)
    if flops_per_s is None:
        import torch

        flops_per_s = matmul_flops("cuda" if torch.cuda.is_available() else "cpu")
    bound = flops / flops_per_s
    if bound <= limit_s:
        return None
    field = "budget.tokens" if plan.spec.comparison_axis == "equal_tokens" else "budget.steps"
    return Advice(field, f"{len(plan.runs)} runs need {flops:.2g} training FLOPs: at least "
                  f"{bound / DAY_S:,.1f} days here, at this machine's best measured matmul speed "
                  f"({flops_per_s / 1e9:,.0f} GFLOP/s; real training is slower). Shrink the budget "
                  "or the model, or run it on faster hardware (`lmlab plan` measures real steps)")
