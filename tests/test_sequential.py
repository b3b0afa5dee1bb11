"""The group-sequential boundaries against published values, and the design's bookkeeping."""

from __future__ import annotations

import math

import pytest
from scipy import stats as st

from lmlab.analysis.sequential import (
    Design,
    Level,
    boundaries,
    calibrated_alpha,
    nominal_levels,
    obf_spending,
)


@pytest.mark.parametrize(("fractions", "expected"), [
    # gsDesign::gsDesign(k, test.type = 1, alpha = 0.025, sfu = sfLDOF)$upper$bound
    ((0.5, 1.0), (2.9626, 1.9686)),
    ((0.25, 0.5, 0.75, 1.0), (4.3326, 2.9631, 2.3590, 2.0141)),
    ((0.2, 0.4, 0.6, 0.8, 1.0), (4.8769, 3.3569, 2.6803, 2.2898, 2.0310)),
])
def test_obrien_fleming_boundaries_match_gsdesign(fractions, expected) -> None:
    assert boundaries(fractions, 0.025) == pytest.approx(expected, abs=2e-4)


def test_the_spending_function_spends_alpha_by_the_final_look() -> None:
    assert obf_spending(0.0, 0.025) == 0.0 and obf_spending(1.0, 0.025) == 0.025
    assert obf_spending(0.5, 0.025) == pytest.approx(2 * st.norm.sf(st.norm.isf(0.0125) / 0.5**0.5))
    spent = [obf_spending(t, 0.05) for t in (0.1, 0.3, 0.6, 0.9)]
    assert spent == sorted(spent) and spent[0] < 1e-5  # O'Brien-Fleming: almost nothing early
    # One look at full information is a fixed design: its boundary is the plain z quantile.
    assert boundaries((1.0,), 0.025)[0] == pytest.approx(st.norm.isf(0.025))
    # A look without new information cannot reject.
    assert nominal_levels((0.5, 0.5, 1.0), 0.025)[1] == 0.0


def test_levels_of_a_fixed_and_a_sequential_design() -> None:
    fixed = Level(0.05)
    assert not fixed.sequential and fixed.two_sided == 0.05 and fixed.equivalence == 0.05
    early = Level(0.05, (0.4,), (2, 3, 4, 5), "paired")
    final = Level(0.05, (0.4, 0.6, 0.8, 1.0), (2, 3, 4, 5), "paired")
    assert early.two_sided < 0.001 < final.two_sided < 0.05  # strict early, near alpha at the end
    # The small-sample correction: the paired t procedure spends less than alpha.
    spend = calibrated_alpha((2, 3, 4, 5), 0.025, "paired")
    assert 0.015 < spend < 0.025
    assert final.two_sided == pytest.approx(2 * nominal_levels((0.4, 0.6, 0.8, 1.0), spend)[-1])


def test_design_rounds_and_information() -> None:
    d = Design(((0, 1), (2,), (3,), (4,)), 0.05)
    assert d.max_seeds == 5 and d.sizes == (2, 3, 4, 5)
    assert d.seeds_through(2) == {0, 1, 2}
    assert d.fraction(3, 2) == pytest.approx(0.6)
    assert d.fraction(4, 4) == 1.0  # the last look spends what is left, whatever its n
    assert Design.from_json(d.to_json()) == d
    assert math.isinf(boundaries((0.0, 1.0), 0.025)[0])
