"""Every test lmlab reports keeps its stated level, by simulation: synthetic per-seed values
drawn thousands of times with a fixed RNG, judged by the same code the report uses.

On A/A data (no real difference) the share of draws where a check is settled either way (a
false positive) must be at most its level, within Monte-Carlo error (three standard errors of
the simulated rate). The sequential procedure is simulated look by look, so its rate is over
all looks together; the Holm family's over all checks together. Power: on correlated pairs (the
common random numbers of a shared seed) the paired test detects more than Welch's, as often as
its own power formula says.

``LMLAB_CALIBRATION_SCALE=10 pytest -s tests/test_calibration.py`` runs ten times the draws and
prints every rate (the numbers quoted in issue 11's resolution note).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from lmlab.analysis.checks import evaluate_check
from lmlab.analysis.sequential import Design
from lmlab.analysis.stats import t_power
from lmlab.analysis.verdict import Pairing, judge
from lmlab.spec.schema import Check

ALPHA = 0.05
WIN = Check(metric="final_val_loss", arm="a", op="<", than="b")
SCALE = float(os.environ.get("LMLAB_CALIBRATION_SCALE", "1"))


def n_draws(base: int) -> int:
    return int(base * SCALE)


def mc_limit(level: float, draws: int, what: str = "", observed: float | None = None) -> float:
    limit = level + 3 * math.sqrt(level * (1 - level) / draws)
    if observed is not None:
        print(f"{what}: {observed:.4f} over {draws} draws (limit {limit:.4f})")
    return limit


def pairs(rng: np.random.Generator, n: int, rho: float, diff: float = 0.0,
          sd_b: float = 1.0) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Seed s of two arms sharing a share ``rho`` of their variance (common random numbers)."""
    shared = rng.normal(0, 1, n)
    a = diff + math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(0, 1, n)
    b = sd_b * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(0, 1, n))
    return list(enumerate(a.tolist())), list(enumerate(b.tolist()))


def rate(draws: int, judge_one) -> float:
    return sum(judge_one() for _ in range(draws)) / draws


@pytest.mark.parametrize(("paired", "n", "rho", "sd_b"), [
    (True, 4, 0.8, 1.0), (True, 2, 0.5, 1.0), (False, 3, 0.0, 2.0), (False, 5, 0.0, 1.0)])
def test_a_directional_check_on_a_a_data_keeps_alpha(paired, n, rho, sd_b) -> None:
    rng = np.random.default_rng(11 + n)
    draws = n_draws(4000)

    def one() -> bool:
        a, b = pairs(rng, n, rho, sd_b=sd_b)
        return evaluate_check(WIN, a, b, paired_seeds=paired, notes=False).settled

    observed = rate(draws, one)
    assert observed <= mc_limit(ALPHA, draws, f"{'paired' if paired else 'Welch'} n={n}", observed)


def test_a_check_against_a_value_and_equivalence_at_its_margin_keep_alpha() -> None:
    rng = np.random.default_rng(5)
    draws = n_draws(4000)
    # One-sample: the true mean sits exactly at value + margin.
    vs_value = Check(metric="final_val_loss", arm="a", op="<", value=5.0, margin=-0.1)
    one_sample = rate(draws, lambda: evaluate_check(
        vs_value, (4.9 + rng.normal(0, 0.05, 4)).tolist(), notes=False).settled)
    assert one_sample <= mc_limit(ALPHA, draws, "one-sample vs value", one_sample)
    # TOST: the true difference sits on the margin, the hardest case for "equivalent".
    eq = Check(metric="final_val_loss", arm="a", op="equivalent", than="b", margin=0.5)
    for paired, rho in ((True, 0.8), (False, 0.0)):
        supported = rate(draws, lambda paired=paired, rho=rho: evaluate_check(
            eq, *pairs(rng, 5, rho, diff=0.5), paired_seeds=paired,
            notes=False).verdict == "supported")
        assert supported <= mc_limit(ALPHA, draws, f"TOST {'paired' if paired else 'Welch'}",
                                     supported)


def _family(rng: np.random.Generator, checks: int, seeds: int, rho: float,
            diff: float = 0.0) -> dict[str, list[tuple[int, float]]]:
    data: dict[str, list[tuple[int, float]]] = {}
    for i in range(checks):
        data[f"a{i}"], data[f"b{i}"] = pairs(rng, seeds, rho, diff)
    return data


def _claims(checks: int) -> list[Check]:
    return [Check(metric="final_val_loss", arm=f"a{i}", op="<", than=f"b{i}")
            for i in range(checks)]


def _judged(data, claims, *, paired: bool, design: Design | None = None,
            same: bool = False):
    return judge(claims, lambda arm, _: data.get(arm), lambda x, y: same,
                 lambda x, y: Pairing(paired, ""), alpha=ALPHA, design=design,
                 looks=len(design.rounds) if design else None, notes=False)


def test_holm_keeps_the_family_wise_rate_over_every_check() -> None:
    rng = np.random.default_rng(21)
    draws, claims = n_draws(3000), _claims(3)

    def one() -> bool:
        v = _judged(_family(rng, 3, 4, 0.7), claims, paired=True)
        return any(r.settled for r in v.checks)

    family = rate(draws, one)
    assert family <= mc_limit(ALPHA, draws, "Holm, 3 checks", family)
    # Without the adjustment three tests at 5% each would reject about 14% of the time.
    assert mc_limit(ALPHA, draws) < 1 - (1 - ALPHA) ** 3


@pytest.mark.parametrize(("rounds", "paired", "checks", "draws"), [
    (((0, 1), (2,), (3,), (4,)), True, 1, 6000),  # smallest looks: 2, 3, 4, 5 seed pairs
    (((0, 1, 2), (3, 4, 5), (6, 7, 8)), False, 2, 1500),  # Welch, two checks sharing alpha
])
def test_the_sequential_procedure_keeps_alpha_over_all_its_looks(rounds, paired, checks,
                                                                  draws) -> None:
    rng = np.random.default_rng(31)
    design = Design(rounds, ALPHA)
    claims = _claims(checks)
    draws = n_draws(draws)
    flagged = 0
    data_sets = [_family(rng, checks, design.max_seeds, 0.8 if paired else 0.0)
                 for _ in range(draws)]
    overall = sum(any(r.settled for r in _judged(d, claims, paired=paired, design=design).checks)
                  for d in data_sets) / draws
    assert overall <= mc_limit(ALPHA, draws, f"sequential {rounds}, {checks} checks", overall)
    # Some of the same draws with the arms known to be one configuration: never supported.
    flagged = sum(any(r.verdict == "supported" for r in _judged(
        d, claims, paired=paired, design=design, same=True).checks) for d in data_sets[::5])
    assert flagged == 0


def test_paired_power_beats_welch_and_matches_its_formula() -> None:
    rng = np.random.default_rng(41)
    n, rho, diff, draws = 6, 0.8, -0.6, n_draws(4000)
    sd_diff = math.sqrt(2 * (1 - rho))  # the spread of a - b when both have unit variance
    paired_hits = welch_hits = 0
    for _ in range(draws):
        a, b = pairs(rng, n, rho, diff)
        paired_hits += evaluate_check(WIN, a, b, paired_seeds=True, notes=False).verdict == \
            "supported"
        welch_hits += evaluate_check(WIN, a, b, notes=False).verdict == "supported"
    paired_power, welch_power = paired_hits / draws, welch_hits / draws
    formula = t_power(abs(diff) * math.sqrt(n) / sd_diff, n - 1, ALPHA)
    print(f"power at n={n}, rho={rho}: paired {paired_power:.3f} (formula {formula:.3f}), "
          f"Welch {welch_power:.3f}")
    assert paired_power > welch_power + 0.2, (paired_power, welch_power)
    # The formula counts both tails; the wrong tail is negligible here.
    assert paired_power == pytest.approx(formula, abs=0.03), (paired_power, formula)


def test_a_clear_effect_stops_before_the_cap() -> None:
    """The other half of a useful sequential design: a large effect is settled early."""
    rng = np.random.default_rng(51)
    design = Design(((0, 1), (2,), (3,), (4,), (5,), (6,)), ALPHA)
    looks = []
    for _ in range(300):
        data = _family(rng, 1, design.max_seeds, 0.8, diff=-1.5)
        r = _judged(data, _claims(1), paired=True, design=design).checks[0]
        looks.append(r.look if r.verdict == "supported" else None)
    decided = [k for k in looks if k is not None]
    assert len(decided) / len(looks) > 0.95
    assert np.median(decided) < len(design.rounds)
