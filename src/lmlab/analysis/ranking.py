"""Which arm is ahead, and whether it is ahead beyond noise: the best mean of the primary metric,
the arms it cannot be told apart from, seeds that disagree more than the arms do, and which arm
reached a loss in the fewest tokens or the least time.

A ranking is only stated when the statistics support it: two arms are compared with the
analysis their design calls for (paired or Welch, :func:`lmlab.analysis.verdict.pairing`) at the
experiment's alpha, and arms whose difference is within noise are tied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lmlab.analysis.stats import Difference, Summary, paired, summarize, welch
from lmlab.analysis.summary import ArmSummary, Experiment
from lmlab.analysis.verdict import pairing
from lmlab.names import RUN_METRICS, VAL_LOSS


def better_of(direction: str) -> Callable[..., Any]:
    """``min`` when lower is better, else ``max``."""
    return min if direction == "lower" else max


# -- ranking ---------------------------------------------------------------------------------


def best_arm(arms: Mapping[str, ArmSummary], primary: str) -> str | None:
    """The arm with the best finite mean of ``primary``, or None when no arm has one."""
    means = {arm: a.stats[primary].mean for arm, a in arms.items()
             if a.stats[primary].n and math.isfinite(a.stats[primary].mean)}
    if not means:
        return None
    return better_of(RUN_METRICS[primary])(means, key=lambda k: means[k])


@dataclass(frozen=True)
class RunnerUp:
    """Another arm, and the test of the best arm minus it (paired or Welch, as the design
    calls for), at level ``alpha``."""

    arm: str
    test: Difference
    alpha: float = 0.05

    @property
    def separated(self) -> bool | None:
        """Whether the difference is shown at ``alpha`` (the 1 - alpha interval excludes 0);
        an exact difference (no spread at all) is separated when it is not 0. None: not
        testable."""
        return separated(self.test, self.alpha)


def separated(t: Difference, alpha: float) -> bool | None:
    if t.testable:
        return t.p is not None and t.p <= alpha
    if (t.reason or "").startswith("no spread"):
        return t.diff != 0
    return None


def compare(a: list[tuple[int, float]], b: list[tuple[int, float]], exp: Experiment | None,
            arm: str, other: str, alpha: float) -> Difference:
    """``arm`` minus ``other`` with the analysis the design calls for (Welch without a design)."""
    if exp is not None and pairing(exp, arm, other).paired:
        return paired(a, b, 1 - alpha)
    return welch([v for _, v in a], [v for _, v in b], 1 - alpha)


def runner_up(arms: Mapping[str, ArmSummary], best: str, primary: str,
              exp: Experiment | None = None, alpha: float = 0.05) -> RunnerUp | None:
    others = {arm: a.stats[primary].mean for arm, a in arms.items()
              if arm != best and a.stats[primary].n}
    if not others:
        return None
    second = better_of(RUN_METRICS[primary])(others, key=lambda k: others[k])
    return RunnerUp(second, compare(arms[best].values[primary], arms[second].values[primary],
                                    exp, best, second, alpha), alpha)


def tied_with_best(arms: Mapping[str, ArmSummary], best: str, primary: str,
                   exp: Experiment | None = None, alpha: float = 0.05) -> list[RunnerUp]:
    """Every other arm with a value whose difference from the best is not shown at ``alpha``
    (untestable ones included): the best arm is not distinguishable from them."""
    out = []
    for arm, a in arms.items():
        if arm == best or not a.stats[primary].n:
            continue
        r = RunnerUp(arm, compare(arms[best].values[primary], a.values[primary], exp, best, arm,
                                  alpha), alpha)
        if not r.separated:
            out.append(r)
    return out


@dataclass(frozen=True)
class DisagreeingSeeds:
    """An arm whose seed-to-seed spread of the primary metric is at least the gap to the nearest
    other arm: its rank among the arms is not reliable."""

    arm: str
    std: float
    gap: float


def disagreeing_seeds(arms: Mapping[str, ArmSummary], primary: str) -> list[DisagreeingSeeds]:
    means = {arm: a.stats[primary].mean for arm, a in arms.items() if a.stats[primary].n >= 1}
    out = []
    for arm, a in arms.items():
        s = a.stats[primary]
        if s.n < 2 or len(means) < 2:
            continue
        gap = min(abs(s.mean - m) for other, m in means.items() if other != arm)
        if s.std >= gap:
            out.append(DisagreeingSeeds(arm, s.std, gap))
    return out


# -- compute efficiency ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    """Per seed, the tokens and training seconds to the first evaluation at or below the
    target (``(seed, value)``), summarised over seeds."""

    tokens: Summary
    seconds: Summary
    tokens_by_seed: tuple[tuple[int, float], ...] = ()
    seconds_by_seed: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Quickest:
    """The arm with the smallest mean, and whether it is ahead of the others beyond noise:
    ``tied`` are the arms its difference from is not shown (then no arm is "quickest")."""

    arm: str
    tied: tuple[RunnerUp, ...]

    @property
    def clear(self) -> bool:
        return not self.tied


@dataclass(frozen=True)
class Efficiency:
    """``target``: the highest final validation loss of any included run, so every run reached
    it. Per seed rather than on a mean curve: seeds of one arm are evaluated at different
    training seconds, and a shared time grid blurs exactly that."""

    target: float
    reach: dict[str, Reach]
    speeds: dict[str, float]  # mean tokens/sec per arm that measured it
    tokens: Quickest | None = None  # the fewest tokens to the target
    seconds: Quickest | None = None  # the least training time to the target

    @property
    def fewest_tokens(self) -> str | None:
        return min(self.reach, key=lambda a: self.reach[a].tokens.mean) if self.reach else None

    @property
    def least_time(self) -> str | None:
        return min(self.reach, key=lambda a: self.reach[a].seconds.mean) if self.reach else None


def _quickest(reach: Mapping[str, Reach], which: str, exp: Experiment | None,
              alpha: float) -> Quickest | None:
    if not reach:
        return None
    by_seed = {arm: list(getattr(r, f"{which}_by_seed")) for arm, r in reach.items()}
    arm = min(reach, key=lambda a: getattr(reach[a], which).mean)
    tied = []
    for other in reach:
        if other != arm:
            r = RunnerUp(other, compare(by_seed[arm], by_seed[other], exp, arm, other, alpha),
                         alpha)
            if not r.separated:
                tied.append(r)
    return Quickest(arm, tuple(tied))


def efficiency(arms: Mapping[str, ArmSummary], exp: Experiment | None = None,
               alpha: float = 0.05) -> Efficiency | None:
    """None when no run has a final validation loss."""
    finals = [v for a in arms.values() for v in a.seeds_values("final_val_loss")]
    if not finals:
        return None
    target = max(finals)
    reach = {}
    for arm, a in arms.items():
        tokens, secs = [], []
        for r in a.runs:
            if not r.included("final_val_loss"):
                continue
            hit = next((row for row in r.curves.get(VAL_LOSS, [])
                        if math.isfinite(row.value) and row.value <= target + 1e-12), None)
            if hit is not None:
                tokens.append((r.seed, float(hit.tokens)))
                secs.append((r.seed, float(hit.wall_s)))
        if tokens:
            reach[arm] = Reach(summarize([v for _, v in tokens]),
                               summarize([v for _, v in secs]), tuple(tokens), tuple(secs))
    speeds = {arm: a.stats["tokens_per_s"].mean for arm, a in arms.items()
              if a.stats["tokens_per_s"].n}
    return Efficiency(target, reach, speeds, _quickest(reach, "tokens", exp, alpha),
                      _quickest(reach, "seconds", exp, alpha))
