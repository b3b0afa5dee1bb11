"""The experiment's verdict: every machine-checkable claim judged with the analysis its design
calls for, at a family-wise level, look by look.

* **Which claims.** The hypothesis checks, and the expected outcomes (section 7) that carry a
  check. The hypothesis verdict is the hypothesis checks' (all supported: supported; any
  refuted: refuted; else inconclusive); each expected outcome is answered on its own (met, not
  met, inconclusive), and one left as prose is "not machine-checked".
* **Which analysis.** :func:`pairing`, from the design before any data is read
  (``analysis.pairing``; ``auto``: paired exactly when both arms were planned with the same
  seeds under a seed policy that shares random numbers), never by picking the smaller p.
* **Family-wise alpha.** Every claim whose verdict rests on a test takes a share of
  ``analysis.alpha`` by Holm's procedure: tested at alpha / (open tests), a settled one passing
  its share on. A fixed design also reports the Holm-adjusted p-values.
* **Looks.** An until-settled experiment (``RESULT_SEQUENTIAL``) is judged look by look, each
  look holding the seeds of the rounds run so far, with the group-sequential levels of
  :mod:`lmlab.analysis.sequential`; a claim settled at one look keeps that verdict. A fixed
  design is one look at its full level. Exact per-seed claims are re-judged on every seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from lmlab.analysis.checks import CheckResult, Outcome, evaluate_check, is_test
from lmlab.analysis.curvestats import arm_values as curve_values
from lmlab.analysis.records import mixed_hardware
from lmlab.analysis.sequential import SPENDING, Design, Level
from lmlab.analysis.stats import holm
from lmlab.analysis.summary import ArmSummary, Experiment, same_config
from lmlab.names import HARDWARE_METRICS
from lmlab.spec.schema import Check, ExpectedOutcome, SeedPolicy

# (seed, value) per arm of one claim at one look; None: no such arm.
Values = list[tuple[int, float]]
ValuesFn = Callable[[str, Check], Values | None]


@dataclass(frozen=True)
class Pairing:
    paired: bool
    reason: str


@dataclass(frozen=True)
class Claim:
    """One machine-checkable claim and where the spec wrote it."""

    check: Check
    source: Literal["hypothesis", "expected"] = "hypothesis"
    outcome: int | None = None  # an expected outcome's index in section 7


@dataclass(frozen=True)
class Look:
    """One look of an until-settled experiment: the seeds every arm had, every claim's result
    at it (a claim settled earlier keeps its result), and whether all were settled."""

    look: int
    seeds: tuple[int, ...]
    results: tuple[CheckResult, ...]
    settled: bool


@dataclass(frozen=True)
class HypothesisVerdict:
    overall: Outcome
    reason: str
    checks: list[CheckResult]  # the hypothesis checks
    # Section 7, every entry: (the outcome, its check's result or None when left as prose).
    outcomes: list[tuple[ExpectedOutcome, CheckResult | None]] = ()  # type: ignore[assignment]
    alpha: float = 0.05
    tests: int = 0  # claims in the Holm family
    design: Design | None = None
    looks: tuple[Look, ...] = ()

    @property
    def settled(self) -> bool:
        """Whether every claim (hypothesis and expected outcomes) is supported or refuted."""
        return all(c.settled for c in self.checks) and all(
            r.settled for _, r in self.outcomes if r is not None)


def pairing(exp: Experiment, arm: str, than: str) -> Pairing:
    """Which analysis compares ``arm`` with ``than``, decided from the design alone."""
    spec = exp.spec
    setting = spec.analysis.pairing if spec else "auto"
    policy = spec.controlled.seed_policy if spec else SeedPolicy()
    if setting == "paired":
        return Pairing(True, "analysis.pairing: paired (seed s of one arm against seed s of "
                             "the other)")
    if setting == "unpaired":
        return Pairing(False, "analysis.pairing: unpaired (Welch's test)")
    seeds_a, seeds_b = _planned_seeds(exp, arm), _planned_seeds(exp, than)
    if not policy.shares_random_numbers:
        return Pairing(False, "pairing auto: the seed policy gives every arm its own random "
                              "numbers (streams: per_arm), so the arms are independent samples "
                              "and Welch's test applies")
    if seeds_a != seeds_b:
        return Pairing(False, f"pairing auto: the arms were planned with different seeds "
                              f"({_seed_list(seeds_a)} vs {_seed_list(seeds_b)}), so Welch's "
                              "test applies")
    return Pairing(True, f"pairing auto: both arms ran seeds {_seed_list(seeds_a)} under a seed "
                         "policy that shares random numbers, so seed s of one arm and seed s of "
                         "the other drew the same initialisation and data order; the per-seed "
                         "differences are analysed (paired t)")


def claims_of(exp: Experiment) -> list[Claim]:
    if exp.spec is None:
        return []
    out = [Claim(c) for c in exp.spec.hypothesis.checks]
    out += [Claim(o.check, "expected", i) for i, o in enumerate(exp.spec.outcomes) if o.check]
    return out


def judge_experiment(exp: Experiment, arms: Mapping[str, ArmSummary],
                     looks: int | None = None) -> HypothesisVerdict:
    """The verdict of ``exp``. ``looks``: how many looks of an until-settled design to replay
    (default: those its driver has judged; at least one)."""
    spec = exp.spec
    alpha = spec.analysis.alpha if spec else 0.05
    design = Design.from_json(exp.sequential["design"]) if exp.sequential else None
    if design is not None and looks is None:
        looks = len(exp.sequential.get("looks", []))  # type: ignore[union-attr]
    cache: dict[tuple[str, int], Values | None] = {}
    claims = claims_of(exp)

    def values(arm: str, check: Check) -> Values | None:
        key = (arm, id(check))
        if key not in cache:
            if arm not in arms:
                cache[key] = None
            elif check.curve is None:
                cache[key] = list(arms[arm].values.get(check.metric or "", []))
            else:
                cache[key] = curve_values(exp.runs_of(arm), check.curve, exp.x_key)
        return cache[key]

    return judge(claims, values, lambda x, y: same_config(exp, x, y),
                 lambda x, y: pairing(exp, x, y), alpha=alpha, design=design,
                 looks=max(1, min(looks or 1, len(design.rounds))) if design else None,
                 prose=spec.outcomes if spec else [],
                 comparable=lambda check: _hardware_differs(exp, check))


def _hardware_differs(exp: Experiment, check: Check) -> str | None:
    """Why a check on speed or memory cannot be judged: its arms' runs recorded different
    hardware (``controlled.hardware`` is a frozen control; a cluster can break it)."""
    if check.metric not in HARDWARE_METRICS:
        return None
    mixed = mixed_hardware([r for arm in (check.arm, check.than) if arm
                            for r in exp.runs_of(arm)])
    if not mixed:
        return None
    return (f"not comparable: {check.metric} depends on the hardware, and these runs ran on "
            f"different hardware ({'; '.join(mixed)})")


def judge(claims: Sequence[Claim | Check], values: ValuesFn,
          is_same_config: Callable[[str, str], bool],
          pairing_of: Callable[[str, str], Pairing] | None = None, *, alpha: float = 0.05,
          design: Design | None = None, looks: int | None = None,
          prose: Sequence[ExpectedOutcome] = (), notes: bool = True,
          comparable: Callable[[Check], str | None] | None = None) -> HypothesisVerdict:
    """Judge every claim. ``values(arm, check)`` gives the included ``(seed, value)`` per run
    (None for an arm the experiment does not have); ``is_same_config(a, b)`` detects A/A pairs;
    ``pairing_of(a, b)`` says whether two arms are compared seed by seed. ``notes``: attach
    power notes and probabilities of improvement to the final results (the verdicts do not
    depend on them; the calibration simulations leave them out). ``comparable(check)``: why a
    check cannot be judged at all (its values are not comparable), or None."""
    items = [c if isinstance(c, Claim) else Claim(c) for c in claims]
    pairing_of = pairing_of or (lambda a, b: Pairing(False, "unpaired"))
    seeds_of = [None] if design is None else [design.seeds_through(k)
                                              for k in range(1, (looks or 1) + 1)]
    tests = [i for i, c in enumerate(items) if is_test(c.check)]
    m = len(tests)
    decided: dict[int, tuple[CheckResult, dict[str, Any]]] = {}
    info: dict[int, list[float]] = {i: [] for i in tests}
    history: list[Look] = []
    last: dict[int, tuple[CheckResult, dict[str, Any]]] = {}

    for k, seeds in enumerate(seeds_of, 1):
        inputs = [_inputs(c.check, values, is_same_config, pairing_of, seeds, comparable)
                  for c in items]
        for i in tests:
            info[i].append(_effective_n(inputs[i]))
        for i, c in enumerate(items):
            if i not in tests or _blocked(inputs[i]):
                last[i] = (_evaluate(c.check, inputs[i], alpha, Level(alpha), False), inputs[i])
        while True:  # Holm at this look: a settled test passes its share to the open ones
            open_ = [i for i in tests if i not in decided and not _blocked(inputs[i])]
            share = alpha / max(1, m - len(decided))
            crossed = None
            for i in open_:
                level = _level(design, share, info[i], k, inputs[i])
                r = _evaluate(items[i].check, inputs[i], alpha, level, False)
                last[i] = (r, {**inputs[i], "level": level})
                if r.settled and crossed is None:
                    crossed = i
            if crossed is None:
                break
            decided[crossed] = (replace(last[crossed][0], look=k), last[crossed][1])
        current = [decided[i][0] if i in decided else last[i][0] for i in range(len(items))]
        history.append(Look(k, tuple(sorted(seeds or ())), tuple(current),
                            all(r.settled for r in current)))

    results = []
    for i, c in enumerate(items):
        r, used = decided.get(i) or last[i]
        full = _evaluate(c.check, used, alpha, used.get("level", Level(alpha)), notes)
        full = replace(full, look=r.look if design else None,
                       pairing_reason=used.get("pairing_reason"),
                       level_note=_level_note(full, used.get("level"), m, alpha, design))
        results.append(full)
    if design is None and m:
        adjusted = holm([results[i].p for i in tests])
        for i, p in zip(tests, adjusted, strict=True):
            results[i] = replace(results[i], p_adjusted=p)

    hyp = [r for r, c in zip(results, items, strict=True) if c.source == "hypothesis"]
    answered = {c.outcome: r for r, c in zip(results, items, strict=True)
                if c.source == "expected"}
    outcome, reason = overall_verdict(hyp)
    return HypothesisVerdict(outcome, reason, hyp,
                             [(o, answered.get(i)) for i, o in enumerate(prose)],
                             alpha, m, design, tuple(history))


def overall_verdict(results: Sequence[CheckResult]) -> tuple[Outcome, str]:
    """All supported -> supported; any refuted -> refuted; else inconclusive."""
    if not results:
        return "inconclusive", "the spec states no machine-checkable checks"
    refuted = [r for r in results if r.verdict == "refuted"]
    if refuted:
        return "refuted", f"{len(refuted)} of {len(results)} checks refuted"
    if all(r.verdict == "supported" for r in results):
        return "supported", f"all {len(results)} checks supported"
    open_ = sum(r.verdict == "inconclusive" for r in results)
    return "inconclusive", f"{open_} of {len(results)} checks inconclusive, none refuted"


# -- helpers -----------------------------------------------------------------------------------


def _blocked(inputs: dict[str, Any]) -> bool:
    """A check that cannot be tested at all: an arm missing, or values not comparable."""
    return bool(inputs.get("missing") or inputs.get("not_comparable"))


def _inputs(check: Check, values: ValuesFn, is_same: Callable[[str, str], bool],
            pairing_of: Callable[[str, str], Pairing],
            seeds: frozenset[int] | None,
            comparable: Callable[[Check], str | None] | None = None) -> dict[str, Any]:
    why = comparable(check) if comparable is not None else None
    if why is not None:
        return {"not_comparable": why}
    missing = [arm for arm in (check.arm, check.than) if arm and values(arm, check) is None]
    if missing:
        return {"missing": missing}

    def at_look(arm: str) -> Values:
        return [(s, v) for s, v in values(arm, check) or [] if seeds is None or s in seeds]

    a = at_look(check.arm)
    if check.than is None:
        return {"a": a, "b": None, "paired": False, "same": False}
    p = pairing_of(check.arm, check.than)
    return {"a": a, "b": at_look(check.than), "paired": p.paired,
            "same": is_same(check.arm, check.than), "pairing_reason": p.reason}


def _evaluate(check: Check, inputs: dict[str, Any], alpha: float, level: Level,
              notes: bool) -> CheckResult:
    if inputs.get("not_comparable"):
        return replace(_no_arm(check, ""), reason=inputs["not_comparable"], test="not comparable",
                       power_note="more seeds cannot help: run every arm on one hardware")
    if inputs.get("missing"):
        return _no_arm(check, ", ".join(map(repr, inputs["missing"])))
    return evaluate_check(check, inputs["a"], inputs["b"], paired_seeds=inputs["paired"],
                          same_configuration=inputs["same"], alpha=alpha, level=level,
                          notes=notes)


def _no_arm(check: Check, names: str) -> CheckResult:
    nan = math.nan
    return CheckResult(description=check.label(), metric=check.measure, arm=check.arm,
                op=check.op, reference=check.than or f"{check.value:g}", margin=check.margin,
                verdict="inconclusive", reason=f"no arm named {names} in this experiment",
                test="no data", n_arm=0, n_ref=None, mean_arm=nan, mean_ref=nan, diff=nan,
                power_note="nothing to estimate a spread from: run the arm first",
                tested=is_test(check))


def _effective_n(inputs: dict[str, Any]) -> float:
    """The sample size a look's information is counted in: matched pairs, the seeds of a
    one-sample test, or the harmonic mean of the two arms' seeds (Welch)."""
    if _blocked(inputs):
        return 0.0
    a, b = inputs["a"], inputs["b"]
    if b is None:
        return float(len(a))
    if inputs["paired"]:
        return float(len({s for s, _ in a} & {s for s, _ in b}))
    return 0.0 if not a or not b else 2.0 * len(a) * len(b) / (len(a) + len(b))


def _level(design: Design | None, share: float, n_by_look: list[float], look: int,
           inputs: dict[str, Any]) -> Level:
    if design is None:
        return Level(share)
    fractions = tuple(design.fraction(n, j) for j, n in enumerate(n_by_look, 1))
    kind = "welch" if inputs.get("b") is not None and not inputs.get("paired") else "paired"
    return Level(share, fractions, design.sizes, kind)


def _level_note(r: CheckResult, level: Level | None, m: int, alpha: float,
                design: Design | None) -> str | None:
    if not r.tested or level is None or r.threshold is None:
        return None
    parts = []
    if m > 1:
        parts.append(f"its Holm share {level.alpha:.3g} of the family-wise α = {alpha:g} "
                     f"over {m} tests")
    if design is not None:
        t = level.fractions[-1]
        parts.append(f"look {level.look} of at most {len(design.rounds)}, {SPENDING} "
                     f"boundary at information fraction {t:.2f}")
    if not parts:
        return None
    return f"tested at p ≤ {r.threshold:.3g}: " + "; ".join(parts)


def _planned_seeds(exp: Experiment, arm: str) -> tuple[int, ...]:
    planned = [int(p["seed"]) for p in exp.planned if p.get("arm") == arm and "seed" in p]
    return tuple(sorted(planned or [r.seed for r in exp.runs_of(arm)]))


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) if seeds else "none"
