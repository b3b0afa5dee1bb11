"""Warnings, not refusals, for settings that are valid but cannot do what they say, each at the
field's line; and the lower bound that tells a budget this machine cannot finish in a day."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.execute.feasible import (
    DAY_S,
    flops_ceiling,
    matmul_flops,
    too_long,
    training_flops,
)
from lmlab.spec.advice import advise
from lmlab.spec.expand import Plan, load_plan
from lmlab.spec.template import CATEGORIES, render
from test_spec import base_spec, line_of

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def sound(articles_data: dict) -> dict:
    """The test spec (12 steps per run) with a spike detector that starts within the run."""
    spec = base_spec(articles_data)
    spec["evaluation"]["diagnostics"]["spike_warmup"] = 4
    return spec


def plan_of(tmp_path: Path, spec: dict) -> Plan:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_plan(path)


def fields(plan: Plan) -> dict[str, str]:
    return {a.field: a.message for a in advise(plan)}


def test_a_sound_spec_gets_no_warning(tmp_path, articles_data):
    assert advise(plan_of(tmp_path, sound(articles_data))) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_examples_do_what_they_say(path):
    assert advise(load_plan(path)) == []


def test_an_evaluation_cadence_longer_than_the_run(tmp_path, articles_data):
    spec = sound(articles_data)  # 12 steps of 256 tokens
    spec["evaluation"].update(every_steps=None, every_tokens=12 * 256)
    got = fields(plan_of(tmp_path, spec))
    assert "3,072 is not less than the run's 3,072 tokens" in got["evaluation.every_tokens"]
    spec["evaluation"].update(every_tokens=None, every_steps=50)
    assert "50 is not less than the run's 12 steps" in \
        fields(plan_of(tmp_path, spec))["evaluation.every_steps"]


def test_a_warmup_that_never_ends_names_the_arm_and_the_line(tmp_path, articles_data):
    spec = sound(articles_data)
    spec["independent"] = {"variables": ["schedule.warmup_steps"],
                           "arms": {"short": {"schedule.warmup_steps": 2},
                                    "long": {"schedule.warmup_steps": 40}}}
    spec["hypothesis"]["checks"] = []
    plan = plan_of(tmp_path, spec)
    (advice,) = advise(plan)
    assert advice.field == "independent"  # an independent variable: said where arms are
    assert advice.message.startswith("arm long: 40 is not less than the run's 12 steps")
    assert "never reaches its peak and the cosine decay never starts" in advice.message
    # frozen, it is blamed at its own line
    spec["independent"] = sound(articles_data)["independent"]
    spec["hypothesis"] = sound(articles_data)["hypothesis"]
    spec["controlled"]["schedule"] = {"warmup_steps": 12}
    plan = plan_of(tmp_path, spec)
    (advice,) = advise(plan)
    assert advice.field == "controlled.schedule.warmup_steps" and not advice.message.startswith("arm")
    assert plan.doc.line_of(advice.field) == line_of(plan.doc.path, "warmup_steps:")


def test_probes_spikes_and_logs_that_never_happen(tmp_path, articles_data):
    spec = sound(articles_data)
    spec["evaluation"]["diagnostics"] = {"every_steps": 13, "spike_warmup": 12}
    spec["cadence"]["log_every_steps"] = 12
    got = fields(plan_of(tmp_path, spec))
    assert "probe-batch diagnostics" in got["evaluation.diagnostics.every_steps"]
    assert "never looked for" in got["evaluation.diagnostics.spike_warmup"]
    assert "a single point" in got["cadence.log_every_steps"]
    # probes switched off on purpose: nothing to warn about
    spec["evaluation"]["diagnostics"] = {
        "every_steps": 13, "layer_grad_norms": False, "norm_grad_norms": False,
        "activation_norms": False, "attention_entropy": False, "update_ratio": False,
        "spike_warmup": 4}
    assert "evaluation.diagnostics.every_steps" not in fields(plan_of(tmp_path, spec))


# ---- a day's work -------------------------------------------------------------------------------

def test_a_budget_a_thousand_times_too_large_is_flagged(tmp_path, articles_data):
    spec = sound(articles_data)
    plan = plan_of(tmp_path, spec)
    per_day = 86_400 * 1e10  # FLOPs one day buys at 10 GFLOP/s
    assert too_long(plan, flops_per_s=1e10) is None
    flops = sum(training_flops(r.config) for r in plan.runs)
    steps = round(1000 * per_day / flops * 12)  # ~1,000 days of this plan's training
    spec["budget"] = {"tokens": steps * 256}
    spec["evaluation"]["every_steps"] = None
    big = plan_of(tmp_path, spec)
    advice = too_long(big, flops_per_s=1e10)
    assert advice is not None and advice.field == "budget.tokens"
    days = float(advice.message.split("at least ")[1].split(" days")[0].replace(",", ""))
    assert days == pytest.approx(1000, rel=0.01)
    assert "10 GFLOP/s" in advice.message


def test_wall_clock_budgets_are_counted_as_written(tmp_path, articles_data):
    spec = sound(articles_data)
    spec.update(comparison_axis="equal_wall_clock", budget={"wall_clock_s": 50_000})
    spec["evaluation"] = {"every_seconds": 600}
    advice = too_long(plan_of(tmp_path, spec))  # 4 runs x 50,000 s
    assert advice is not None and "4 runs of 50,000 training seconds" in advice.message
    spec["budget"] = {"wall_clock_s": 600}
    assert too_long(plan_of(tmp_path, spec)) is None
    # an evaluation every 600 s of a 600 s run: only the start and the end
    got = fields(plan_of(tmp_path, spec))
    assert "600 is not less than the run's 600 training seconds" in got["evaluation.every_seconds"]


def test_the_quick_ceiling_is_never_below_the_exact_count(tmp_path):
    """Small plans skip torch by a ceiling on their FLOPs: it must really be one."""
    plans = [load_plan(p) for p in EXAMPLES]
    for category in CATEGORIES:
        path = tmp_path / f"{category}.yaml"
        path.write_text(render(category, category))
        plans.append(load_plan(path))
    for plan in plans:
        for run in plan.runs:
            assert flops_ceiling(run.config) >= training_flops(run.config) > 0


def test_matmul_probe_measures_something_plausible():
    assert 1e8 < matmul_flops(seconds=0.05) < 1e15
    assert DAY_S == 86_400
