"""Where a run stands between two steps (:class:`RunState`) and why it stopped
(:class:`StopReason`). Both are plain data: a checkpoint saves the state with ``state_dict()``
and a resumed run continues from ``load_state_dict()`` as if it had never stopped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import torch

from lmlab.config import BudgetConfig, EvaluationConfig
from lmlab.names import Status


class Point(NamedTuple):
    """Where in a run something happened: any of the three can be a plot's x-axis."""

    step: int
    tokens: int
    seconds: float  # training seconds (evaluation, probes and checkpoints excluded)


class StopReason(StrEnum):
    """Why the loop ended. Each maps to the run status the store records."""

    BUDGET = "budget"  # the budget is spent: the run completed
    INTERRUPTED = "interrupted"  # asked to stop (Ctrl-C, SIGTERM); resumes from its checkpoint
    NON_FINITE = "non_finite"  # a non-finite loss or gradient norm, before the optimizer step
    DIVERGED = "diverged"  # the loss rose above divergence_factor x its early value
    OVER_MEMORY = "over_memory"  # peak memory above budget.max_memory_mb
    OOM = "oom"  # the device or the process ran out of memory

    @property
    def status(self) -> Status:
        return _STATUS[self]

    @property
    def reason(self) -> str:
        return _REASON[self]


_STATUS = {
    StopReason.BUDGET: Status.COMPLETED, StopReason.INTERRUPTED: Status.INTERRUPTED,
    StopReason.NON_FINITE: Status.DIVERGED, StopReason.DIVERGED: Status.DIVERGED,
    StopReason.OVER_MEMORY: Status.OVER_BUDGET, StopReason.OOM: Status.OVER_BUDGET,
}
_REASON = {
    StopReason.BUDGET: "budget spent",
    StopReason.INTERRUPTED: "interrupted",
    StopReason.NON_FINITE: "non-finite loss or gradient norm",
    StopReason.DIVERGED: "loss above divergence_factor x early loss",
    StopReason.OVER_MEMORY: "peak memory above budget.max_memory_mb",
    StopReason.OOM: "out of memory",
}


def eval_cadence(cfg: EvaluationConfig) -> tuple[str, float]:
    """(the quantity evaluations are spaced on, the spacing): tokens, steps, training seconds,
    or by default a tenth of the run's progress."""
    if cfg.every_tokens:
        return "tokens", float(cfg.every_tokens)
    if cfg.every_steps:
        return "step", float(cfg.every_steps)
    if cfg.every_seconds:
        return "seconds", float(cfg.every_seconds)
    return "progress", 0.1


@dataclass
class RunState:
    """Counters, the evaluation cadence and the RNG: what the loop's decisions read.

    The RNG is torch's global one, which a solo run's dropout draws from; a packed member draws
    from its own ``generator`` instead, saved in the same place, so a member's checkpoint
    resumes solo or packed alike (see :mod:`lmlab.model.stacked`)."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # training sequences consumed: the position in the data order
    tokens: int = 0  # training tokens seen
    seconds: float = 0.0  # training seconds
    next_eval: float = math.nan  # the cadence quantity at which the next evaluation is due
    rng: dict[str, Any] = field(default_factory=dict)  # filled by state_dict()
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    @property
    def at(self) -> Point:
        return Point(self.step, self.tokens, self.seconds)

    def progress(self, budget: BudgetConfig) -> float:
        return budget.progress(self.step, self.tokens, self.seconds)

    def advance(self, sequences: int, seq_len: int, seconds: float) -> None:
        """One optimizer step of ``sequences`` x ``seq_len`` tokens taking ``seconds``."""
        self.step += 1
        self.samples += sequences
        self.tokens += sequences * seq_len
        self.seconds += seconds

    def attempted(self, sequences: int, seq_len: int, seconds: float) -> Point:
        """A step that was computed but not applied (non-finite): its time counts, its counters
        do not. Returns the point it would have reached."""
        self.seconds += seconds
        return Point(self.step + 1, self.tokens + sequences * seq_len, self.seconds)

    def rewind(self, to: Point, samples: int, seconds: float) -> None:
        """Back to ``to`` (a step found non-finite after later ones were computed, with the
        device-side check: their time counts up to ``seconds``, their counters do not)."""
        self.step, self.tokens, self.samples, self.seconds = to.step, to.tokens, samples, seconds

    def eval_due(self, cadence: tuple[str, float], budget: BudgetConfig) -> bool:
        """Whether the cadence quantity crossed the next multiple of its spacing (then the next
        one is scheduled). Called once per step."""
        on, every = cadence
        value = {"tokens": self.tokens, "step": self.step, "seconds": self.seconds,
                 "progress": self.progress(budget)}[on]
        if math.isnan(self.next_eval):
            self.next_eval = every
        if value + 1e-12 < self.next_eval:
            return False
        while self.next_eval <= value + 1e-12:
            self.next_eval += every
        return True

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        g = self.generator
        if g is not None:
            rng["torch" if g.device.type == "cpu" else "device"] = g.get_state()
        return {**{k: getattr(self, k) for k in _COUNTERS}, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in _COUNTERS:
            setattr(self, key, state[key])
        rng, g = state["rng"], self.generator
        if g is not None and g.device.type == "cpu":
            g.set_state(rng["torch"])
        else:
            torch.set_rng_state(rng["torch"])
        if g is not None and g.device.type != "cpu" and "device" in rng:
            g.set_state(rng["device"])
        elif "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


_COUNTERS = ("step", "samples", "tokens", "seconds", "next_eval")
