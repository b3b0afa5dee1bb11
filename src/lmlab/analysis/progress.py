"""Where each arm's training stood at the end of its budget, judged against the seed noise and
stated either way: still improving (under-trained: a longer budget would change the numbers by
more than the seeds disagree), flat (converged at this budget, as far as these seeds can tell),
or getting worse. And every run whose last evaluation was worse than the one before it.

Evaluations are only compared like for like. With ``evaluation.max_batches`` the periodic
evaluations are on the first N batches of the validation split and the final one on the whole
split: a different sample of text, so the change from the last capped evaluation to the final
one mixes training progress with the split's difference. Then the capped evaluations are
compared with each other and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmlab.analysis.records import Evaluation, RunRecord, evaluations
from lmlab.analysis.summary import ArmSummary

# With one seed there is no spread to judge a change by: 1% of the loss instead.
ONE_SEED_IMPROVEMENT = 0.01
INTERVALS = 2  # evaluation intervals at the end of the run that "still improving" looks at

State = Literal["improving", "flat", "worsening"]


@dataclass(frozen=True)
class Progress:
    """One arm's validation loss over its last ``intervals`` comparable evaluation intervals.

    ``drop``: the mean over its completed seeds of how much it fell (negative: it rose);
    ``spread``: the seed-to-seed std of its final validation loss (None with one seed, when
    ``yardstick`` is 1% of the loss instead). ``state`` compares the two.
    """

    drop: float
    spread: float | None
    intervals: int = INTERVALS
    state: State = "improving"
    yardstick: float = 0.0
    capped: bool = False  # compared on the capped periodic evaluations (see the module doc)

    @property
    def under_trained(self) -> bool:
        return self.state == "improving"


@dataclass(frozen=True)
class WorseAtEnd:
    """A completed run whose last (comparable) evaluation was worse than the one before it."""

    run_id: str
    arm: str
    seed: int
    before: Evaluation
    last: Evaluation
    spread: float | None  # its arm's seed spread of the final validation loss
    capped: bool

    @property
    def rise(self) -> float:
        return self.last.loss - self.before.loss

    @property
    def beyond_noise(self) -> bool | None:
        return None if self.spread is None else self.rise > self.spread


def comparable_evaluations(run: RunRecord) -> tuple[list[Evaluation], bool]:
    """The run's evaluations that measure the same text, and whether they are the capped ones
    (the final full-split evaluation left out)."""
    evals = [e for e in evaluations(run) if math.isfinite(e.loss)]
    capped = bool((run.config.get("evaluation") or {}).get("max_batches")) and run.completed
    return (evals[:-1], True) if capped and len(evals) > 1 else (evals, False)


def progress(arms: Mapping[str, ArmSummary]) -> dict[str, Progress]:
    """Every arm with at least one completed seed that has ``INTERVALS`` comparable intervals."""
    out = {}
    for arm, a in arms.items():
        drops, capped = [], False
        for r in a.runs:
            evals, capped_r = comparable_evaluations(r)
            if r.completed and len(evals) > INTERVALS:
                drops.append(evals[-1 - INTERVALS].loss - evals[-1].loss)
                capped = capped or capped_r
        if not drops:
            continue
        drop = float(np.mean(drops))
        s = a.stats["final_val_loss"]
        spread = s.std if s.n >= 2 else None
        yardstick = spread if spread is not None else ONE_SEED_IMPROVEMENT * abs(s.mean)
        state: State = "improving" if drop > yardstick else \
            "worsening" if drop < -yardstick else "flat"
        out[arm] = Progress(drop, spread, INTERVALS, state, yardstick, capped)
    return out


def under_trained(arms: Mapping[str, ArmSummary]) -> dict[str, Progress]:
    """The arms still improving by more than the seed noise at the end of their budget."""
    return {arm: p for arm, p in progress(arms).items() if p.under_trained}


def worse_at_end(arms: Mapping[str, ArmSummary]) -> list[WorseAtEnd]:
    out = []
    for a in arms.values():
        s = a.stats["final_val_loss"]
        spread = s.std if s.n >= 2 else None
        for r in a.runs:
            evals, capped = comparable_evaluations(r)
            if r.completed and len(evals) >= 2 and evals[-1].loss > evals[-2].loss:
                out.append(WorseAtEnd(r.run_id, r.arm, r.seed, evals[-2], evals[-1], spread,
                                      capped))
    return out
