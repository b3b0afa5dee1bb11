"""Settings that are valid but cannot do what they say: a warning each, never a refusal.

An evaluation cadence longer than the run, a warmup that never ends, diagnostics or a spike
detector that never start: the spec validates and the runs go ahead, but the curve, schedule or
detector the user asked for will not be there. ``lmlab validate``, ``plan`` and ``run`` print
these as ``file:line field: warning`` lines; the decision to go ahead stays the user's.

Each check reads the resolved run configs (after the comparison axis has fixed each arm's
steps), so "longer than the run" means longer than that arm's run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lmlab.config import Components, RunConfig
from lmlab.spec.expand import Plan


@dataclass(frozen=True)
class Advice:
    """One warning: the spec field it is about (dotted, as written) and what will happen."""

    field: str
    message: str


def _evaluation(cfg: RunConfig, steps: int | None) -> Iterator[tuple[str, str]]:
    e, b = cfg.evaluation, cfg.budget
    spacing = [("every_tokens", e.every_tokens, b.tokens, "tokens"),
               ("every_steps", e.every_steps, steps, "steps"),
               ("every_seconds", e.every_seconds, b.wall_clock_s, "training seconds")]
    for name, every, length, unit in spacing:
        if every is not None and length is not None and every >= length:
            yield (f"evaluation.{name}", f"{_n(every)} is not less than the run's {_n(length)} "
                   f"{unit}: validation runs only at the start and at the end, so the "
                   "val-loss curve has two points")
            return  # the first cadence set is the one used (lmlab.train.state.eval_cadence)
        if every is not None:
            return


def _n(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,g}"


def _diagnostics(cfg: RunConfig, steps: int | None) -> Iterator[tuple[str, str]]:
    d = cfg.evaluation.diagnostics
    if steps is None:
        return
    if d.any_probe and d.every_steps > steps:
        yield ("evaluation.diagnostics.every_steps",
               f"{d.every_steps:,} is more than the run's {steps:,} steps: the probe-batch "
               "diagnostics (activation norms, LN gradient norms, attention entropy, update "
               "ratios) are never taken")
    if d.spike_warmup >= steps:
        yield ("evaluation.diagnostics.spike_warmup",
               f"{d.spike_warmup:,} is not less than the run's {steps:,} steps: loss spikes are "
               "never looked for")


def _cadence(cfg: RunConfig, steps: int | None) -> Iterator[tuple[str, str]]:
    every = cfg.cadence.log_every_steps
    if steps is not None and every >= steps > 1:
        yield ("cadence.log_every_steps",
               f"{every:,} is not less than the run's {steps:,} steps: one log interval, so the "
               "train-loss curve, step time and tokens/sec have a single point")


def _schedule(cfg: RunConfig, steps: int | None) -> Iterator[tuple[str, str]]:
    s = cfg.schedule
    if steps is not None and s.warmup_frac is None and s.warmup_steps >= steps:
        decay = "" if s.name == "constant" else f" and the {s.name} decay never starts"
        yield ("schedule.warmup_steps",
               f"{s.warmup_steps:,} is not less than the run's {steps:,} steps: the warmup never "
               f"ends, so the learning rate never reaches its peak{decay}")


# Each takes an arm's config and its steps (None on a wall-clock budget: not known before it runs).
CHECKS: tuple[Callable[[RunConfig, int | None], Iterator[tuple[str, str]]], ...] = (
    _evaluation, _diagnostics, _cadence, _schedule)
def advise(plan: Plan) -> list[Advice]:
    """Every warning of ``plan``, once per field and message, naming the arms it concerns when
    not all of them."""
    found: dict[tuple[str, str], list[str]] = {}
    for arm in plan.arms:
        cfg = plan.arm_config(arm)
        for check in CHECKS:
            for field, message in check(cfg, cfg.budget.steps):
                found.setdefault((field, message), []).append(arm)
    out = []
    for (field, message), arms in found.items():
        where = field
        if field.split(".", 1)[0] in Components.model_fields:  # written under `controlled`
            where = "independent" if field in plan.variables else f"controlled.{field}"
        who = "" if len(arms) == len(plan.arms) else f"arm {', '.join(arms)}: "
        out.append(Advice(where, f"{who}{message}"))
    return out
