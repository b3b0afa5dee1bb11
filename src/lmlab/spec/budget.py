"""Budgets by comparison axis: each arm's steps, tokens or training seconds (a budget the axis
cannot honour is refused with the reason), and a curve statistic's window on that axis."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lmlab.config import TrainConfig
from lmlab.spec.load import YamlDoc
from lmlab.spec.schema import Check, Spec

if TYPE_CHECKING:
    from lmlab.spec.expand import Plan


AXIS_UNIT = {"equal_tokens": "tokens", "equal_steps": "steps", "equal_wall_clock": "seconds"}


def check_window(spec: Spec, doc: YamlDoc, plan: Plan, where: str, check: Check) -> None:
    """A curve statistic's window: on the comparison axis, ordered, inside the budget, and for
    an evaluation curve holding at least one evaluation."""
    curve = check.curve
    assert curve is not None
    axis = AXIS_UNIT[spec.comparison_axis]
    unit = curve.unit
    if unit is None:
        return
    field = f"{where}.{unit}"
    if unit != axis:
        per_step = {r.config.train.tokens_per_step for r in plan.runs}
        ramps = any(max(r.config.train.seq_len_warmup_steps, r.config.train.batch_ramp_steps)
                    for r in plan.runs)
        hint = ""
        if {unit, axis} == {"tokens", "steps"} and len(per_step) == 1 and not ramps:
            k = per_step.pop()
            lo, hi = curve.window  # type: ignore[misc]
            conv = [(b if isinstance(b, str) else f"{b * k:g}" if unit == "steps" else
                     f"{b / k:g}") for b in (lo, hi)]
            hint = (f": every arm takes {k:,} tokens per step, so write {axis}: "
                    f"[{conv[0]}, {conv[1]}]")
        raise doc.error(field, f"windows are on the comparison axis ({spec.comparison_axis}: "
                        f"{axis}), so that every arm is measured at the same amount of training"
                        f"{hint}")
    total = {"tokens": spec.budget.tokens, "steps": spec.budget.steps,
             "seconds": spec.budget.wall_clock_s}[axis]
    lo, hi = curve.bounds(total)
    if lo < 0 or hi < 0:
        raise doc.error(field, f"a window cannot start or end before 0 (got [{lo:g}, {hi:g}])")
    if lo >= hi:
        raise doc.error(field, f"the window is empty: it must start before it ends "
                        f"(got [{lo:g}, {hi:g}])")
    if total is not None and hi > total * (1 + 1e-9):
        raise doc.error(field, f"the window ends at {hi:,g} {axis}, after the budget's "
                        f"{total:,g}")
    if curve.metric.startswith("test_") and hi < total:  # type: ignore[operator]
        raise doc.error(field, f"{curve.metric} is measured once, at the end of the run: the "
                        "window must reach the end of the budget")
    if curve.metric.startswith("val_") and total is not None:
        e = spec.evaluation
        every = {"tokens": e.every_tokens, "steps": e.every_steps, "seconds": e.every_seconds}[axis]
        if every:
            # Evaluations happen at 0, at every multiple of the cadence, and at the end; a
            # window (lo, hi] holds the first multiple after lo.
            first = (math.floor(lo / every + 1e-9) + 1) * every
            if not (lo <= 0 or first <= hi or hi >= total):
                raise doc.error(field, f"the window [{lo:,g}, {hi:,g}] holds no evaluation of "
                                f"{curve.metric} (every {every:,g} {axis}): widen it")



def _steps_for_tokens(train: TrainConfig, tokens: int) -> int | None:
    """The whole number of steps that sees exactly ``tokens`` tokens, or None."""
    ramp_steps = max(train.seq_len_warmup_steps, train.batch_ramp_steps)
    ramp_tokens = train.tokens_after(ramp_steps)
    if tokens < ramp_tokens:
        return next((s for s in range(ramp_steps + 1) if train.tokens_after(s) == tokens), None)
    rest = tokens - ramp_tokens
    per_step = train.tokens_per_step
    return ramp_steps + rest // per_step if rest % per_step == 0 else None


# Per comparison axis: the budget field it needs, what it gives every arm, and what another
# budget field would do to that promise.
AXIS_BUDGET = {
    "equal_tokens": ("tokens", "derives each arm's steps from budget.tokens",
                     "end arms at different token counts"),
    "equal_steps": ("steps", "gives every arm budget.steps", "end arms at different step counts"),
    "equal_wall_clock": ("wall_clock_s", "gives every arm the same training seconds",
                         "stop arms early"),
}


def resolve_budget(spec: Spec, doc: YamlDoc, arm: str, tree: dict[str, Any],
                    evaluation: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    b, axis = spec.budget, spec.comparison_axis
    train = TrainConfig.model_validate(tree["train"])
    budget: dict[str, Any] = {"max_memory_mb": b.max_memory_mb}
    eval_cfg = dict(evaluation)
    needed, gives, breaks = AXIS_BUDGET[axis]
    if getattr(b, needed) is None:
        raise doc.error(f"budget.{needed}", f"comparison_axis {axis} needs budget.{needed}")
    for other in ("tokens", "steps", "wall_clock_s"):
        if other != needed and getattr(b, other) is not None:
            raise doc.error(f"budget.{other}", f"{axis} {gives}; a budget.{other} would {breaks}: "
                            "remove it")
    if axis == "equal_tokens":
        steps = _steps_for_tokens(train, b.tokens)
        if steps is None:
            per_step = train.tokens_per_step
            lo = b.tokens // per_step * per_step
            raise doc.error("budget.tokens",
                            f"arm {arm}: {b.tokens:,} tokens is not a whole number of steps of "
                            f"{per_step:,} tokens (batch_size {train.batch_size} x seq_len "
                            f"{train.seq_len}); try {lo:,} or {lo + per_step:,}, or a multiple "
                            "of every arm's tokens per step")
        budget.update(tokens=b.tokens, steps=steps)
    elif axis == "equal_steps":
        budget.update(steps=b.steps, tokens=train.tokens_after(b.steps))
    else:  # equal_wall_clock
        if evaluation["every_tokens"] or evaluation["every_steps"]:
            raise doc.error("evaluation", "equal_wall_clock evaluates at the same wall-clock points: "
                            "use evaluation.every_seconds, not every_tokens/every_steps")
        budget.update(wall_clock_s=b.wall_clock_s)
        eval_cfg["every_seconds"] = evaluation["every_seconds"] or b.wall_clock_s / 10
    if budget.get("steps") is not None and budget["steps"] < 1:
        raise doc.error("budget", f"arm {arm}: the budget is less than one step")
    return budget, eval_cfg
