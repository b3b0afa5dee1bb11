"""Group-sequential boundaries: how strict each look at a growing experiment must be so that the
whole procedure, however many looks it takes, keeps its stated alpha.

An until-settled experiment (``lmlab run --until-settled``) looks at its data after every round
of seeds. Testing each look at the full alpha would inflate the false-positive rate (five looks
at 5% each reject a true null about 14% of the time). The boundaries here spend alpha over the
looks with the **Lan-DeMets O'Brien-Fleming-type spending function** (Lan & DeMets, 1983)

    alpha(t) = 2 - 2 * Phi(z_{1 - alpha/2} / sqrt(t))        (one-sided level alpha)

where t is the information fraction: the seeds (per arm, or matched pairs) a look has, over
the cap ``max_seeds`` it may grow to; the look at the cap has t = 1 and spends what is left.
Early looks get almost nothing (at t = 0.5 the nominal one-sided level is about 0.0015 for a
total of 0.025), so the final look keeps nearly the full alpha.

The boundary c_k of look k (on the z scale) solves

    P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = alpha(t_k) - alpha(t_{k-1})

under the null, where Z_k = S(t_k) / sqrt(t_k) for a Brownian motion S (independent increments
of variance t_k - t_{k-1}). It is computed by recursive numerical integration of the density of
S over the continuation region (Armitage, McPherson & Rowe, 1969; Jennison & Turnbull, 2000,
ch. 19) on a grid, with the crossing probability solved by Brent's method. Boundaries are
one-sided and binding-free (no futility bound); a two-sided test at level a uses the one-sided
boundaries at a/2 on each side, which holds its level by the union bound.

Seed statistics are t statistics with few degrees of freedom, not z: a look's test rejects when
its own p-value (from its t distribution) is at most the look's **nominal level**
1 - Phi(c_k), the "significance level" approach (Jennison & Turnbull, 2000, sec. 3.8). At the
sample sizes seed studies live at that is not enough: the variance estimate changes from look to
look, the looks are less correlated than the normal theory assumes, and the procedure rejects a
true null too often (simulated: 5.6% at a stated 5% for looks at 2, 3, 4 and 5 seed pairs).
So the alpha fed to the spending function is **calibrated per design**: the looks' t statistics
are simulated under the null (the paired t is pivotal, so this is exact up to Monte-Carlo error;
Welch's test is simulated at equal variances, where it is closest to its nominal level),
100,000 paths with a fixed RNG, and the largest spending level whose procedure rejects at most
alpha (less two Monte-Carlo standard errors) is used. ``tests/test_calibration.py`` checks the
whole procedure's false-positive rate by an independent simulation.

Several checks share the family-wise alpha by Holm's procedure applied at every look (the
sequentially rejective scheme of Maurer & Bretz, 2013): each open check is tested at
alpha / (number of open checks), and a settled check passes its share on to the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy import stats as st

SPENDING = "Lan-DeMets O'Brien-Fleming"
GRID = 801  # points of the continuation-region grid per look
PATHS = 100_000  # simulated null experiments per calibration
MAX_LOOKS = 20  # more rounds than this: raise seeds_per_round


def obf_spending(t: float, alpha: float) -> float:
    """The one-sided alpha spent by information fraction ``t`` (0 at t = 0, ``alpha`` at 1)."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return alpha
    return float(2.0 * st.norm.sf(st.norm.isf(alpha / 2) / math.sqrt(t)))


@lru_cache(maxsize=4096)
def _boundaries(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
    out: list[float] = []
    grid = dens = weights = None
    t_prev, spent = 0.0, 0.0
    for t in fractions:
        if t <= t_prev + 1e-12:  # no new information since the last look: nothing to test
            out.append(math.inf)
            continue
        target = obf_spending(t, alpha) - spent
        spent += target
        sd = math.sqrt(t - t_prev)
        if target <= 1e-15:
            b = math.inf
        elif grid is None:
            b = float(st.norm.isf(target)) * math.sqrt(t)
        else:
            b = float(optimize.brentq(_excess_crossing, -10.0 * math.sqrt(t), 40.0 * math.sqrt(t),
                                      args=(grid, weights, sd, target), xtol=1e-10))
        out.append(b / math.sqrt(t))
        # The density of S(t) over the continuation region (-inf, b), on a grid.
        top = b if math.isfinite(b) else 10.0 * math.sqrt(t)
        new_grid = np.linspace(-10.0 * math.sqrt(t), top, GRID)
        if grid is None:
            new_dens = st.norm.pdf(new_grid / math.sqrt(t)) / math.sqrt(t)
        else:
            z = (new_grid[:, None] - grid[None, :]) / sd
            new_dens = (np.exp(-0.5 * z * z) / (sd * math.sqrt(2 * math.pi))) @ weights
        grid, dens = new_grid, new_dens
        h = grid[1] - grid[0]
        weights = dens * h
        weights[0] *= 0.5
        weights[-1] *= 0.5
        t_prev = t
    return tuple(out)


def _excess_crossing(b: float, grid: np.ndarray, weights: np.ndarray, sd: float,
                     target: float) -> float:
    """P(continue to this look, then cross ``b``) minus the alpha this look may spend."""
    return float(np.sum(weights * st.norm.sf((b - grid) / sd))) - target


def boundaries(fractions: Sequence[float], alpha: float) -> tuple[float, ...]:
    """One-sided z boundaries of looks at information ``fractions`` (increasing, in (0, 1]) for
    a total one-sided level ``alpha``. A look with no new information gets an infinite one."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return _boundaries(tuple(round(min(max(t, 0.0), 1.0), 12) for t in fractions), alpha)


def nominal_levels(fractions: Sequence[float], alpha: float) -> tuple[float, ...]:
    """The one-sided p-value each look's test must reach: 1 - Phi(c_k)."""
    return _nominal(tuple(fractions), alpha)


@lru_cache(maxsize=4096)
def _nominal(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
    return tuple(float(st.norm.sf(c)) if math.isfinite(c) else 0.0
                 for c in boundaries(fractions, alpha))


@lru_cache(maxsize=64)
def _null_p(sizes: tuple[int, ...], kind: str) -> np.ndarray:
    """(PATHS, looks) one-sided p-values of each look's t-test on null data: the one-sample t
    of ``sizes[k]`` differences (``paired``), or Welch's t of two arms of ``sizes[k]`` seeds
    each at equal variances (``welch``). A fixed RNG: the same design, the same calibration."""
    rng = np.random.default_rng(1983)  # Lan & DeMets
    out = np.ones((PATHS, len(sizes)))
    arms = 1 if kind == "paired" else 2
    s1, s2 = np.zeros((arms, PATHS)), np.zeros((arms, PATHS))
    seen = 0
    for k, n in enumerate(sizes):
        if n > seen:
            x = rng.standard_normal((arms, PATHS, n - seen))
            s1 += x.sum(axis=2)
            s2 += (x * x).sum(axis=2)
            seen = n
        if n < 2:
            continue  # no spread, no test
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1) / n  # squared standard errors
        if kind == "paired":
            t, df = mean[0] / np.sqrt(var[0]), np.full(PATHS, n - 1.0)
        else:
            t = (mean[0] - mean[1]) / np.sqrt(var[0] + var[1])
            df = (var[0] + var[1]) ** 2 / ((var[0] ** 2 + var[1] ** 2) / (n - 1))
        out[:, k] = special.stdtr(df, -t)
    return out


@lru_cache(maxsize=1024)
def calibrated_alpha(sizes: tuple[int, ...], alpha: float, kind: str) -> float:
    """The one-sided level to spend so that a one-sided t procedure with looks at ``sizes``
    (planned seeds, or seed pairs, per look) rejects a true null with probability at most
    ``alpha``: ``alpha`` itself when the nominal levels already keep it, else smaller, found by
    bisection on the simulated null p-values."""
    p = _null_p(sizes, kind)
    fractions = tuple(n / sizes[-1] for n in sizes)

    def rate(a: float) -> float:
        return float((p <= np.array(nominal_levels(fractions, a))).any(axis=1).mean())

    target = alpha - 2 * math.sqrt(alpha * (1 - alpha) / PATHS)
    if rate(alpha) <= target:
        return alpha
    lo, hi = alpha / 8, alpha
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if rate(mid) <= target else (lo, mid)
    return lo


@dataclass(frozen=True)
class Level:
    """How strict one check's test is at one look: its Holm share ``alpha`` of the family-wise
    level, spent over ``fractions`` (its information at each look so far; one look at 1.0 is a
    fixed design, where the nominal level is ``alpha`` itself). ``sizes``: the design's planned
    seeds per look, and ``kind`` (``paired`` or ``welch``) the test, for the calibration."""

    alpha: float
    fractions: tuple[float, ...] = (1.0,)
    sizes: tuple[int, ...] = ()
    kind: str = "paired"

    def one_sided(self, a: float) -> float:
        """The nominal one-sided level at this look for a total one-sided level ``a``."""
        if not self.sequential:
            return a
        spend = calibrated_alpha(self.sizes, a, self.kind) if len(self.sizes) > 1 else a
        return nominal_levels(self.fractions, spend)[-1]

    @property
    def two_sided(self) -> float:
        """The two-sided p a directional check's test must reach (boundaries at alpha/2 a side)."""
        return 2.0 * self.one_sided(self.alpha / 2)

    @property
    def equivalence(self) -> float:
        """The p both one-sided tests of TOST must reach (each at the full ``alpha``)."""
        return self.one_sided(self.alpha)

    @property
    def sequential(self) -> bool:
        return self.fractions != (1.0,)

    @property
    def look(self) -> int:
        return len(self.fractions)


@dataclass(frozen=True)
class Design:
    """An until-settled experiment's design, fixed before its first look: the seeds of each
    round (the declared seeds first) up to ``max_seeds`` per arm, and the family-wise alpha."""

    rounds: tuple[tuple[int, ...], ...]
    alpha: float
    spending: str = SPENDING

    @property
    def max_seeds(self) -> int:
        return sum(len(r) for r in self.rounds)

    def seeds_through(self, look: int) -> frozenset[int]:
        """The seeds every arm has run by look ``look`` (1-based)."""
        return frozenset(s for r in self.rounds[:look] for s in r)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Seeds per arm at each planned look."""
        return tuple(len(self.seeds_through(k)) for k in range(1, len(self.rounds) + 1))

    def fraction(self, n: float, look: int) -> float:
        """The information fraction of a look with effective sample size ``n``; the last
        round's look spends what is left (t = 1)."""
        return 1.0 if look >= len(self.rounds) else min(n / self.max_seeds, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"rounds": [list(r) for r in self.rounds], "alpha": self.alpha,
                "spending": self.spending, "max_seeds": self.max_seeds}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Design:
        return cls(tuple(tuple(r) for r in record["rounds"]), float(record["alpha"]),
                   record.get("spending", SPENDING))
