"""Nuisance variables in the plan: each arm becomes a tuning sweep (one configuration per
searched point, run at the tuning seeds) and, once the driver has selected a point, the arm's
confirmation runs at it. :func:`units` lists the configurations :func:`lmlab.spec.expand.expand`
resolves and checks, the controls included, one by one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmlab.names import Role
from lmlab.spec.schema import Nuisance, Spec

Point = dict[str, Any]  # nuisance path -> value


@dataclass(frozen=True)
class Unit:
    """One configuration to resolve: an arm, or an arm at one nuisance point."""

    key: str
    arm: str
    role: str
    point: Point
    values: dict[str, Any]  # what it sets: the arm's values and the point
    where: str  # the YAML field its arm was written at

    @property
    def label(self) -> str:
        at = ", ".join(f"{p} = {v!r}" for p, v in self.point.items())
        return f"arm {self.arm}" + (f" at {at}" if self.role == Role.TUNING else "")


def initial_points(nuisance: Nuisance | None) -> list[Point]:
    """The nuisance search's first points: its grid, in order (no nuisance: one empty point)."""
    return [{}] if nuisance is None else nuisance.points()


def middle_point(nuisance: Nuisance) -> Point:
    """The middle of the first search: where the preflight checks a sweep, and where ``lmlab
    plan`` times the confirmation runs before any value is selected."""
    points = nuisance.points()
    return points[(len(points) - 1) // 2]


def units(spec: Spec, design: list[tuple[str, dict[str, Any], str]],
          tuning: dict[str, list[Point]] | None, selected: dict[str, Point] | None) -> list[Unit]:
    """What to resolve: each arm (no nuisance); else each arm at each of its tuning points, and
    at its selected point once there is one."""
    nuisance = spec.independent.nuisance
    if nuisance is None:
        return [Unit(n, n, Role.CONFIRMATION, {}, v, w) for n, v, w in design]
    out = []
    for name, values, where in design:
        points = (tuning or {}).get(name) or initial_points(nuisance)
        for i, point in enumerate(points):
            out.append(Unit(f"{name}~{i}", name, Role.TUNING, point, {**values, **point}, where))
        if selected and name in selected:
            point = selected[name]
            out.append(Unit(name, name, Role.CONFIRMATION, point, {**values, **point}, where))
    return out
