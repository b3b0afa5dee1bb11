"""Learning-rate schedules as pure functions of (step, progress).

A schedule returns the lr multiplier (1.0 at the peak) that ``set_lr`` applies to every group.
``step`` is the 0-based optimizer step; ``progress`` in [0, 1] is the share of the run's budget
already spent before this step — steps, tokens or wall-clock, whichever budget binds (the caller
decides). Being pure, a schedule has no state to checkpoint: a resumed run recomputes it.

Warmup is linear: over ``warmup_steps`` steps as (step+1)/(warmup_steps+1), so the first step is
never taken at lr 0; or, when ``warmup_frac`` is set, as progress/warmup_frac over that share of
the budget (the same share for every arm, whatever their step counts). After warmup:

  constant      1.
  cosine        half a cosine from 1 at the end of warmup to ``min_lr_ratio`` at the end of the run.
  linear        a straight line over the same span.
  wsd           warmup–stable–decay: 1, then a straight line down to ``min_lr_ratio`` over the
                last ``decay_frac`` of the run.
  inverse_sqrt  1/sqrt(t/t_warmup), with t and t_warmup in steps (in progress with warmup_frac;
                in steps from 1 without warmup), floored at ``min_lr_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lmlab.config import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    """``schedule(step, progress) -> multiplier``; a frozen dataclass so it pickles and prints."""

    cfg: ScheduleConfig

    def __call__(self, step: int, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        warmup = self._warmup(step, progress)
        if warmup is not None:
            return warmup
        floor = self.cfg.min_lr_ratio
        name = self.cfg.name
        if name == "constant":
            return 1.0
        if name == "cosine":
            t = self._decay_progress(step, progress)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "linear":
            t = self._decay_progress(step, progress)
            return floor + (1.0 - floor) * (1.0 - t)
        if name == "wsd":
            decay_start = 1.0 - self.cfg.decay_frac
            if progress <= decay_start:
                return 1.0
            t = (progress - decay_start) / self.cfg.decay_frac
            return floor + (1.0 - floor) * (1.0 - t)
        if name == "inverse_sqrt":
            frac = self.cfg.warmup_frac
            if frac:
                ratio = progress / frac
            else:
                # warmup_frac == 0 means no warmup, even if warmup_steps is also set.
                warmup_steps = self.cfg.warmup_steps if frac is None else 0
                ratio = max(step, 1) / max(warmup_steps, 1)
            return max(floor, 1.0 / math.sqrt(max(ratio, 1.0)))
        raise ValueError(f"unknown schedule {name!r}")

    def _warmup(self, step: int, progress: float) -> float | None:
        """The warmup multiplier, or None once warmup is over."""
        frac = self.cfg.warmup_frac
        if frac is not None:
            return progress / frac if progress < frac else None
        steps = self.cfg.warmup_steps
        return (step + 1) / (steps + 1) if step < steps else None

    def _decay_progress(self, step: int, progress: float) -> float:
        """Share of the post-warmup part of the run already done, in [0, 1]: 0 right after warmup
        (so cosine and linear start exactly at the peak), 1 at the end of the budget."""
        frac = self.cfg.warmup_frac
        if frac is None:
            steps = self.cfg.warmup_steps
            # The progress at which a step-counted warmup ended is not passed in; infer it
            # assuming progress grows in proportion to steps (exact for a step budget, or a token
            # budget at a fixed batch size; close for wall-clock). It equals `progress` at the
            # first post-warmup step, so the decay always starts from exactly 1.
            frac = progress * steps / step if steps else 0.0
        if frac >= 1.0:
            return 1.0
        return min(max((progress - frac) / (1.0 - frac), 0.0), 1.0)


def build_schedule(cfg: ScheduleConfig) -> Callable[[int, float], float]:
    """The lr multiplier schedule ``cfg`` describes: ``(step, progress) -> multiplier``."""
    return LRSchedule(cfg)
