"""Every example spec in ``examples/`` is valid, plans its runs, and reads as a genuine question:
validated in-process (``load_plan``) and through the CLI (``lmlab validate`` exits 0, ``lmlab plan
--no-estimate --json`` lists the runs), on real WikiText-2, sized for a CPU, with a GPU recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.driver import stand_in
from lmlab.model import build_model
from lmlab.spec.expand import Plan, load_plan

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
CATEGORIES = {"hyperparam", "optimizer", "memory", "architecture", "recipe"}
# Training FLOPs (6N + attention, per token, summed over every run) an example may spend. A
# 2-layer d=128 GPT trains at ~15 GFLOP/s on 2 busy CPU cores (measured: ~2,700 tokens/s at
# 5.7 MFLOP/token), so this is ~9 minutes of training, leaving the rest of the 15 minutes for
# evaluation, preflight and start-up. (quickstart: 5.8e12.)
MAX_TRAIN_FLOPS = 8e12


def _id(path: Path) -> str:
    return path.stem


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module", params=EXAMPLES, ids=_id)
def example(request: pytest.FixtureRequest) -> tuple[Path, Plan]:
    path: Path = request.param
    # A tuned example's confirmation runs at a stand-in value (its tuning selects the real one).
    return path, stand_in(load_plan(path))


def test_examples_exist_for_every_category() -> None:
    categories = {load_plan(p).spec.meta.category for p in EXAMPLES}
    assert categories >= CATEGORIES, f"missing: {CATEGORIES - categories}"


def test_example_plans_every_arm_and_seed_on_real_wikitext(example: tuple[Path, Plan]) -> None:
    path, plan = example
    spec = plan.spec
    tuning = plan.nuisance
    assert len(plan.confirmation_runs) == len(plan.arms) * len(spec.meta.seeds) >= 2
    assert len(plan.runs) - len(plan.confirmation_runs) == (
        len(plan.arms) * len(tuning.points()) * len(tuning.seeds) if tuning else 0)
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    assert spec.controlled.data.dataset == "wikitext-2-raw-v1"
    for r in plan.runs:
        assert r.config.data.dataset == "wikitext-2-raw-v1"
        assert r.config.budget.steps and r.config.budget.steps >= 1
    # Written as a researcher would: the template's sections are filled in, none left as a
    # placeholder, and the prediction is machine-checkable against arms of this plan.
    text = path.read_text()
    assert "__" not in text.replace("__init__", "")
    h = spec.hypothesis
    for field in (spec.objective, h.mechanism, h.prediction, h.falsification):
        assert len(field.split()) >= 8
    assert spec.expected_outcomes
    assert h.checks or spec.meta.category == "memory"
    for check in h.checks:
        assert check.arm in plan.arms and (check.than is None or check.than in plan.arms)
    assert "GPU" in text  # how to scale it up: a shape and budget block to swap


def test_example_is_sized_for_two_cpu_cores(example: tuple[Path, Plan]) -> None:
    _, plan = example
    flops = 0.0
    for r in plan.runs:
        cfg = r.config
        vocab = cfg.tokenizer.vocab_size if cfg.tokenizer.kind == "bpe" else 50257
        model = build_model(cfg.model, vocab, cfg.train.seq_len)
        flops += model.flops_per_token(cfg.train.seq_len) * cfg.budget.tokens
    assert flops <= MAX_TRAIN_FLOPS, f"{flops:.3g} training FLOPs: too big for 15 CPU minutes"


def test_cli_validate_and_plan_list_the_runs(example: tuple[Path, Plan]) -> None:
    path, plan = example
    done = _cli("validate", str(path))
    assert done.returncode == 0, done.stderr
    tuning = len(plan.runs) - len(plan.confirmation_runs)
    assert (f"{tuning} tuning runs" if tuning else f"{len(plan.runs)} runs") in \
        " ".join(done.stdout.split())
    done = _cli("plan", "--no-estimate", "--json", str(path))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert [r["run_id"] for r in record["runs"]] == [r.run_id for r in plan.runs]
    assert record["axis"] == plan.spec.comparison_axis
    for row, run in zip(record["runs"], plan.runs, strict=True):
        assert row["steps"] == run.config.budget.steps >= 1
        assert row["tokens"] == run.config.budget.tokens


def test_batch_lr_example_asks_the_templates_question() -> None:
    """"Does increasing batch size allow a proportionally larger stable learning rate?": the
    scaled arm's lr/batch ratio equals the baseline's, with controls on both sides, every arm
    on the same tokens and the same warmup tokens (derived by the expression language)."""
    plan = load_plan(Path(__file__).resolve().parents[1] / "examples" / "hyperparam_batch_lr.yaml")
    assert plan.spec.meta.category == "hyperparam"
    assert "batch size" in plan.spec.objective and "learning rate" in plan.spec.objective
    cfg = {arm: plan.arm_config(arm) for arm in plan.arms}
    base, scaled = cfg["b8_lr3e-3"], cfg["b32_lr1.2e-2"]

    def lr_per_seq(c):
        return c.optimizer.lr / c.train.batch_size

    assert scaled.train.batch_size == 4 * base.train.batch_size
    assert lr_per_seq(scaled) == pytest.approx(lr_per_seq(base))
    assert cfg["b32_lr3e-3"].optimizer.lr == base.optimizer.lr  # control: unscaled lr
    assert cfg["b8_lr1.2e-2"].optimizer.lr == scaled.optimizer.lr  # control: lr without batch
    assert "schedule.warmup_steps" in plan.spec.independent.derived
    warmup_tokens = {c.schedule.warmup_steps * c.train.tokens_per_step for c in cfg.values()}
    assert len(warmup_tokens) == 1
    assert len({c.budget.tokens for c in cfg.values()}) == 1


def test_batch_lr_scaling_example_tunes_the_lr_per_batch_size() -> None:
    """The template's question as it can be answered: the batch size is the scientific
    variable, the learning rate a nuisance searched on a log grid for every batch size at
    several tuning seeds (an interval for the exponent needs more than one), with the warmup
    tokens equal in every arm."""
    plan = load_plan(Path(__file__).resolve().parents[1] / "examples" /
                     "hyperparam_batch_lr_scaling.yaml")
    n = plan.nuisance
    assert n is not None and list(n.search) == ["optimizer.lr"] and n.log_scale("optimizer.lr")
    assert len(n.seeds) >= 3 and n.extend >= 1 and n.select.startswith("final_val")
    batches = sorted({r.config.train.batch_size for r in plan.runs})
    assert len(batches) >= 3 and "optimizer.lr" not in str(plan.spec.independent.arms)
    warmup = {r.config.schedule.warmup_steps * r.config.train.tokens_per_step for r in plan.runs}
    assert len(warmup) == 1
