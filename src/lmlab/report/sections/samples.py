"""Samples: continuations of the spec's fixed prompts by each arm's final model
(``evaluation.samples``), as the runs stored them. One seed per arm is shown (the lowest that
has samples: every arm's seed s is the same initialisation and data order under a shared seed
policy, so arms are read side by side); the HTML report folds in the other seeds."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.report.inputs import ReportInputs


@dataclass(frozen=True)
class SeedSamples:
    run_id: str
    seed: int
    items: list[tuple[str, str]]  # (prompt, continuation)


@dataclass(frozen=True)
class ArmSamples:
    arm: str
    shown: SeedSamples
    others: list[SeedSamples]


@dataclass(frozen=True)
class Samples:
    arms: list[ArmSamples]
    settings: str  # how they were decoded, or "" when no run has samples


def section(inputs: ReportInputs) -> Samples:
    exp = inputs.exp
    arms, settings = [], ""
    for arm in exp.arms:
        seeds = []
        for r in sorted(exp.runs_of(arm), key=lambda r: r.seed):
            record = exp.samples.get(r.run_id)
            if not record or not record.get("samples"):
                continue
            seeds.append(SeedSamples(r.run_id, r.seed, [
                (str(s.get("prompt", "")), str(s.get("continuation", "")))
                for s in record["samples"]]))
            settings = settings or _settings(record.get("settings") or {})
        if seeds:
            arms.append(ArmSamples(arm, seeds[0], seeds[1:]))
    return Samples(arms, settings)


def _settings(s: dict) -> str:
    top_k = s.get("top_k")
    how = ("greedy" if s.get("temperature") == 0 else
           f"temperature {s.get('temperature')}, " + (f"top-k {top_k}" if top_k else "no top-k"))
    return (f"{s.get('max_new_tokens')} new tokens per prompt, {how}, decoding seed "
            f"{s.get('seed')}, from each run's final weights after training")
