"""What the data says beyond the hypothesis checks: the judgements a report writes up (which arm
is best and by how much, or which arms tie within noise; where each arm's training stood at the
end; which arms were unstable or noisy, and whether that is what the hypothesis predicted;
whether variables interact; which arm reached a loss soonest; where the sweep should go next;
whether the experiment is ready for Phase-1).

Rankings (:mod:`lmlab.analysis.ranking`) are only stated beyond noise; training progress
(:mod:`lmlab.analysis.progress`) is judged against the seed noise and stated either way.

Pure functions of an :class:`~lmlab.analysis.summary.Experiment` and its
:class:`~lmlab.analysis.summary.ArmSummary` per arm, returning frozen dataclasses: numbers and
names, never prose, so the report words them and tests check them without parsing text.
:func:`find` computes all of them once.

``primary`` is the metric arms are ranked by (``evaluation.primary_metric``); which direction is
better comes from ``lmlab.names.RUN_METRICS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.analysis.predictions import PredictedInstability, predicted_instability
from lmlab.analysis.progress import (
    Progress,
    WorseAtEnd,
    progress,
    under_trained,
    worse_at_end,
)
from lmlab.analysis.ranking import (
    DisagreeingSeeds,
    Efficiency,
    Quickest,
    Reach,
    RunnerUp,
    best_arm,
    better_of,
    compare,
    disagreeing_seeds,
    efficiency,
    runner_up,
    separated,
    tied_with_best,
)
from lmlab.analysis.summary import ArmSummary, Experiment
from lmlab.analysis.verdict import HypothesisVerdict
from lmlab.names import (
    INSTABILITY_EVENTS,
    PER_SEED_PATHS,
    RUN_METRICS,
    Event,
    Status,
)

# Seeds of one arm do the same work: a relative spread of throughput above this means the
# machine was shared or throttled, not that the arms differ.
NOISY_THROUGHPUT = 0.15
# Re-exported: the report and the tests read every judgement from here.
__all__ = ["DisagreeingSeeds", "Efficiency", "PredictedInstability", "Progress", "Quickest",
           "Reach", "RunnerUp", "WorseAtEnd", "best_arm", "disagreeing_seeds",
           "efficiency", "runner_up", "separated", "tied_with_best", "under_trained"]
# What counts as the training going wrong, per arm (section 9's "Any instability?").
UNSTABLE_EVENTS = (*INSTABILITY_EVENTS, Event.OOM)


def memory_kind(exp: Experiment) -> str:
    """What the runs' peak memory counts: ``cuda_allocated``, ``rss`` or ``mixed``. Runs record
    it; an experiment from before they did is judged by its provenance."""
    kinds = {r.summary.get("peak_mem_kind") for r in exp.runs if r.summary.get("peak_mem_kind")}
    if not kinds:
        on_gpu = any(r.provenance.get("gpu_count")
                     and str(r.provenance.get("device", "")).startswith("cuda") for r in exp.runs)
        kinds = {"cuda_allocated" if on_gpu else "rss"}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# -- how the runs went -----------------------------------------------------------------------


@dataclass(frozen=True)
class Spikes:
    """An arm's loss spikes: how many, in which seeds, and the largest (by z-score)."""

    count: int
    seeds: tuple[int, ...]
    n_runs: int
    worst_seed: int
    worst: dict[str, Any]  # the event: step, tokens, detail (loss, mean, z)


def spikes(exp: Experiment) -> dict[str, Spikes]:
    out = {}
    for arm in exp.arms:
        found = [(r, e) for r in exp.runs_of(arm) for e in r.events if e["kind"] == Event.SPIKE]
        if found:
            run, worst = max(found, key=lambda re: float(re[1]["detail"].get("z") or 0.0))
            out[arm] = Spikes(len(found), tuple(sorted({r.seed for r, _ in found})),
                              len(exp.runs_of(arm)), run.seed, worst)
    return out


@dataclass(frozen=True)
class ArmStability:
    """An arm's instability events (``UNSTABLE_EVENTS`` that happened, summed over its runs) and
    the mean over seeds of each seed's largest gradient norm."""

    arm: str
    events: dict[str, int]
    max_grad_norm: float | None

    @property
    def stable(self) -> bool:
        return not self.events


def instability(arms: Mapping[str, ArmSummary]) -> list[ArmStability]:
    """One entry per arm that has anything to report (events, or a gradient norm)."""
    out = []
    for arm, a in arms.items():
        counts = Counter(e["kind"] for r in a.runs for e in r.events)
        events = {str(k): counts[k] for k in UNSTABLE_EVENTS if counts.get(k)}
        g = a.stats["max_grad_norm"]
        grad = g.mean if g.n else None
        if events or grad is not None:
            out.append(ArmStability(arm, events, grad))
    return out


@dataclass(frozen=True)
class NoisyThroughput:
    arm: str
    mean: float
    std: float

    @property
    def relative(self) -> float:
        return self.std / self.mean


def noisy_throughput(arms: Mapping[str, ArmSummary]) -> list[NoisyThroughput]:
    """Arms whose seeds' tokens/sec spread by more than ``NOISY_THROUGHPUT`` of the mean: speed
    comparisons between arms are then unreliable."""
    out = []
    for arm, a in arms.items():
        s = a.stats["tokens_per_s"]
        if s.n >= 2 and s.mean > 0 and s.std / s.mean > NOISY_THROUGHPUT:
            out.append(NoisyThroughput(arm, s.mean, s.std))
    return out


# -- interactions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interaction:
    """The best value of ``variable`` at each level of ``other`` (as raw config values), and at
    each level whether it is ahead of the level's next-best value beyond noise (``clear``)."""

    variable: str
    other: str
    best_at: tuple[tuple[Any, Any], ...]  # (level of other, best value of variable)
    clear: tuple[bool | None, ...] = ()

    @property
    def depends(self) -> bool:
        """The best mean value differs between levels."""
        return len({_key(best) for _, best in self.best_at}) > 1

    @property
    def shown(self) -> bool:
        """It differs, and at every level the best value is ahead beyond noise."""
        return self.depends and len(self.clear) == len(self.best_at) and all(self.clear)


@dataclass(frozen=True)
class Interactions:
    variables: tuple[str, ...]  # the independent variables (the seed excluded)
    pairs: tuple[Interaction, ...]  # empty when the design does not cross the variables


def _key(value: Any) -> Any:
    """A config value as a dict key (lists are not hashable)."""
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    return repr(value) if isinstance(value, dict) else value


def interactions(exp: Experiment, arms: Mapping[str, ArmSummary], primary: str,
                 alpha: float = 0.05) -> Interactions:
    """For each ordered pair of variables, the best value of one at each level of the other,
    where a level tries at least two values of it (judged on the mean of ``primary``, then
    tested against the level's next-best arm with the design's analysis at ``alpha``)."""
    variables = tuple(v for v in exp.variables if v not in PER_SEED_PATHS)
    if len(variables) < 2:
        return Interactions(variables, ())
    means = {arm: a.stats[primary].mean for arm, a in arms.items() if a.stats[primary].n}
    values = {arm: exp.arm_values(arm) for arm in means}
    pick = better_of(RUN_METRICS[primary])
    pairs = []
    for var in variables:
        for other in variables:
            if other == var:
                continue
            groups: dict[Any, tuple[Any, list[str]]] = {}
            for arm in means:
                level = values[arm].get(other)
                groups.setdefault(_key(level), (level, []))[1].append(arm)
            best_at, clear = [], []
            for level, members in groups.values():
                if len({_key(values[a].get(var)) for a in members}) >= 2:
                    winner = pick(members, key=lambda a: means[a])
                    rivals = [a for a in members
                              if _key(values[a].get(var)) != _key(values[winner].get(var))]
                    second = pick(rivals, key=lambda a: means[a])
                    best_at.append((level, values[winner].get(var)))
                    clear.append(separated(compare(arms[winner].values[primary],
                                                   arms[second].values[primary], exp, winner,
                                                   second, alpha), alpha))
            if len(best_at) >= 2:
                pairs.append(Interaction(var, other, tuple(best_at), tuple(clear)))
    return Interactions(variables, tuple(pairs))


# -- where to go next ------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeOfRange:
    """The best arm's value of a numeric variable is the smallest or largest tried: the optimum
    may lie outside the sweep. ``next_value`` continues the sweep's own spacing (geometric when
    every level is positive, else arithmetic)."""

    variable: str
    value: Any
    low: float
    high: float
    upward: bool
    next_value: float


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def edge_of_range(exp: Experiment, best: str) -> list[EdgeOfRange]:
    out = []
    best_values = exp.arm_values(best)
    for var in exp.variables:
        levels = sorted({float(v) for arm in exp.arms
                         if _number(v := exp.arm_values(arm).get(var))})
        value = best_values.get(var)
        if len(levels) < 2 or not _number(value) or float(value) not in (levels[0], levels[-1]):
            continue
        upward = float(value) == levels[-1]
        if not upward and levels[0] <= 0 <= min(levels):
            continue  # 0 warmup steps, 0 dropout: nothing lies below a natural zero
        if all(x > 0 for x in levels):
            ratio = levels[-1] / levels[-2] if upward else levels[1] / levels[0]
            nxt = float(value) * ratio if upward else float(value) / ratio
        else:
            step = levels[-1] - levels[-2] if upward else levels[1] - levels[0]
            nxt = float(value) + step if upward else float(value) - step
        out.append(EdgeOfRange(var, value, levels[0], levels[-1], upward, nxt))
    return out


@dataclass(frozen=True)
class Phase1:
    """Whether the experiment can move on to Phase-1, and what stands in the way."""

    verdict: str  # the hypothesis verdict: supported | refuted | inconclusive
    verdict_reason: str
    preflight_failed: bool
    failed: tuple[str, ...]  # run ids that failed or went over budget
    unfinished: tuple[str, ...]  # run ids pending, running or interrupted
    diverged: tuple[str, ...]  # caveats a supported verdict carries along
    under_trained: tuple[str, ...]  # arms
    seeds_needed: int | None  # per arm, to settle the hardest inconclusive check

    @property
    def ready(self) -> bool:
        return (self.verdict == "supported" and not self.preflight_failed and not self.failed
                and not self.unfinished)


def phase1(exp: Experiment, verdict: HypothesisVerdict,
           under: Mapping[str, Progress]) -> Phase1:
    pre = exp.preflight
    need = [c.seeds_needed for c in verdict.checks
            if c.seeds_needed and c.verdict == "inconclusive"]
    return Phase1(
        verdict=verdict.overall, verdict_reason=verdict.reason,
        preflight_failed=pre is not None and not pre.get("passed", True),
        failed=_ids(exp, (Status.FAILED, Status.OVER_BUDGET)),
        unfinished=_ids(exp, (Status.PENDING, Status.RUNNING, Status.INTERRUPTED)),
        diverged=_ids(exp, (Status.DIVERGED,)), under_trained=tuple(under),
        seeds_needed=max(need) if need else None)


def _ids(exp: Experiment, statuses: Sequence[str]) -> tuple[str, ...]:
    return tuple(r.run_id for r in exp.runs if r.status in statuses)


# -- all of it -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Findings:
    best: str | None  # the best mean of the primary metric (a preference only if not tied)
    runner_up: RunnerUp | None
    tied: list[RunnerUp]  # arms the best one is not distinguishable from
    disagreeing: list[DisagreeingSeeds]
    under_trained: dict[str, Progress]  # the arms still improving beyond noise
    progress: dict[str, Progress]  # every arm, stated either way
    worse_at_end: list[WorseAtEnd]
    spikes: dict[str, Spikes]
    instability: list[ArmStability]
    predicted: list[PredictedInstability]
    noisy_throughput: list[NoisyThroughput]
    interactions: Interactions
    efficiency: Efficiency | None
    edge_of_range: list[EdgeOfRange]
    phase1: Phase1
    alpha: float = 0.05


def find(exp: Experiment, arms: Mapping[str, ArmSummary], verdict: HypothesisVerdict,
         primary: str) -> Findings:
    alpha = exp.spec.analysis.alpha if exp.spec else 0.05
    best = best_arm(arms, primary)
    under = under_trained(arms)
    return Findings(
        best=best,
        runner_up=runner_up(arms, best, primary, exp, alpha) if best is not None else None,
        tied=tied_with_best(arms, best, primary, exp, alpha) if best is not None else [],
        disagreeing=disagreeing_seeds(arms, primary),
        under_trained=under,
        progress=progress(arms),
        worse_at_end=worse_at_end(arms),
        spikes=spikes(exp),
        instability=instability(arms),
        predicted=predicted_instability(exp),
        noisy_throughput=noisy_throughput(arms),
        interactions=interactions(exp, arms, primary, alpha),
        efficiency=efficiency(arms, exp, alpha),
        edge_of_range=edge_of_range(exp, best) if best is not None else [],
        phase1=phase1(exp, verdict, under),
        alpha=alpha,
    )
