"""Spec -> Plan: arms x seeds, each a fully resolved RunConfig, with the controls enforced.

1. Arms come from ``independent`` (named arms, a grid or a zip), plus derived values computed by
   the safe expression language (``lmlab.spec.expr``).
2. Every arm's config is the frozen ``controlled`` tree with only that arm's values changed. Any
   difference between two arms in a variable that is not declared independent is refused.
3. The comparison axis fixes each run's budget (equal tokens, steps or training seconds); a budget
   the axis cannot honour is refused with the reason.
4. Every arm runs every seed of ``meta.seeds`` (and, run ``--until-settled``, the seeds of each
   further round), with the seed's parts (init, data order) set by ``controlled.seed_policy``.
5. With nuisance variables (``independent.nuisance``) every arm is first a tuning sweep (each of
   its points x the tuning seeds, controls checked for every point), and its confirmation runs
   are planned once the driver has selected its point.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmlab.config import Components, RunConfig, error_fields, flatten, set_path
from lmlab.identity import run_id, tuning_run_id
from lmlab.names import EFFECTIVE_BATCH_PATHS, PER_SEED_PATHS, Role
from lmlab.spec import expr
from lmlab.spec.baseline import extend
from lmlab.spec.budget import check_window, resolve_budget
from lmlab.spec.footprint import check_fits, host_memory_bytes
from lmlab.spec.load import YamlDoc, load_yaml, upgrade_spec_doc, validate
from lmlab.spec.nuisance import Point, middle_point
from lmlab.spec.nuisance import units as nuisance_units
from lmlab.spec.schema import Check, Nuisance, SeedPolicy, Spec

# Sections of RunConfig an arm may change. Budgets are fixed by the axis, seeds by meta.seeds.
VARIABLE_SECTIONS = tuple(Components.model_fields)  # data, tokenizer, model, ..., train
NOT_INDEPENDENT = dict.fromkeys(PER_SEED_PATHS, "seeds are set by meta.seeds, the same for "
                                "every arm")


@dataclass(frozen=True)
class PlannedRun:
    """One (arm, seed) of an experiment, fully resolved; a tuning run also has its nuisance
    values (``point``)."""

    run_id: str
    arm: str
    seed: int
    config: RunConfig
    values: dict[str, Any]  # the arm's independent (and derived) values, for tables
    role: str = Role.CONFIRMATION
    point: dict[str, Any] = field(default_factory=dict)  # the nuisance values it ran at

    @property
    def tuning(self) -> bool:
        return self.role == Role.TUNING


@dataclass
class Plan:
    spec: Spec
    doc: YamlDoc
    arms: dict[str, dict[str, Any]]  # arm -> its independent (and derived) values
    variables: list[str]  # declared independent paths, derived ones included
    reference: str
    runs: list[PlannedRun] = field(default_factory=list)
    # With nuisance variables: each arm's searched points, and its selected one once tuning
    # has chosen (the arm's confirmation runs exist only then).
    tuning: dict[str, list[Point]] = field(default_factory=dict)
    selected: dict[str, Point] = field(default_factory=dict)

    @property
    def nuisance(self) -> Nuisance | None:
        return self.spec.independent.nuisance

    @property
    def confirmation_runs(self) -> list[PlannedRun]:
        return [r for r in self.runs if not r.tuning]

    @property
    def preflight_runs(self) -> list[PlannedRun]:
        """The runs whose configurations the Overfit Sanity check covers: every confirmation
        run and, for a tuning sweep, each arm at the middle of its first search (the edges of
        a learning-rate sweep are there to find where training fails: a memorisation check
        failing at them says nothing about the pipeline)."""
        if self.nuisance is None:
            return self.runs
        return [r for r in self.runs if not r.tuning or r.point == middle_point(self.nuisance)]

    @property
    def base(self) -> Path:
        return self.doc.path.resolve().parent

    def arm_config(self, arm: str) -> RunConfig:
        return next(r.config for r in self.runs if r.arm == arm)

    def on_data(self, data: Any) -> Plan:
        """This plan with ``controlled.data`` replaced (a fallback corpus), expanded again."""
        if data is self.spec.controlled.data:
            return self
        spec = self.spec.model_copy(deep=True)
        spec.controlled.data = data
        return expand(spec, self.doc, seeds=sorted({r.seed for r in self.confirmation_runs}) or
                      None, tuning=self.tuning or None, selected=self.selected or None)

    def to_json(self) -> dict[str, Any]:
        return {
            "axis": self.spec.comparison_axis,
            "reference": self.reference,
            "variables": self.variables,
            "runs": [
                {"run_id": r.run_id, "arm": r.arm, "seed": r.seed, "values": r.values,
                 "role": str(r.role), "point": r.point,
                 "tokens": r.config.budget.tokens, "steps": r.config.budget.steps,
                 "wall_clock_s": r.config.budget.wall_clock_s,
                 "effective_batch": r.config.train.batch_size,
                 "tokens_per_step": r.config.train.tokens_per_step}
                for r in self.runs
            ],
        }


def load_spec(path: Path | str) -> tuple[Spec, YamlDoc]:
    doc = extend(upgrade_spec_doc(load_yaml(path)))  # a baseline's tree under the spec's own
    return validate(doc, Spec), doc


def load_plan(path: Path | str) -> Plan:
    spec, doc = load_spec(path)
    return expand(spec, doc)


def spec_checks(spec: Spec) -> Iterator[tuple[str, Check]]:
    """Every machine-checkable claim of a spec, with the YAML field it was written at: the
    hypothesis checks, then the expected outcomes that carry one."""
    for i, check in enumerate(spec.hypothesis.checks):
        yield f"hypothesis.checks.{i}", check
    e = spec.expected_outcomes
    for i, outcome in enumerate([] if isinstance(e, str) else e):
        if not isinstance(outcome, str) and outcome.check is not None:
            yield f"expected_outcomes.{i}.check", outcome.check


def seed_parts(policy: SeedPolicy, arm: str, seed: int) -> dict[str, int | None]:
    """The seed's parts of one run (``train.init_seed``, ``train.data_seed``; None: the run's
    seed). Under ``streams: per_arm`` each arm draws its own from a hash of (arm, seed, part),
    so no two arms share random numbers."""

    def part(name: str, value: int | str) -> int | None:
        if value != "per_seed":
            return int(value)
        if policy.shares_random_numbers:
            return None
        text = f"{arm}/{seed}/{name}".encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:4], "big") >> 1

    return {"init_seed": part("init", policy.init), "data_seed": part("data", policy.data_order)}


def seed_rounds(spec: Spec, max_seeds: int, per_round: int | None = None) -> list[list[int]]:
    """The seeds of each round of an until-settled experiment: the declared seeds first, then
    ``per_round`` more (default: as many as declared), the smallest unused seed values, until
    ``max_seeds`` per arm."""
    declared = list(spec.meta.seeds)
    per_round = per_round or spec.analysis.seeds_per_round or len(declared)
    rounds, used = [declared], set(declared)
    # A nuisance sweep's tuning seeds are never confirmation seeds.
    taken = used | set(spec.independent.nuisance.seeds if spec.independent.nuisance else ())
    candidates = (s for s in itertools.count() if s not in taken)
    while len(used) < max_seeds:
        new = [next(candidates) for _ in range(min(per_round, max_seeds - len(used)))]
        used.update(new)
        rounds.append(new)
    return rounds


def _arm_name(values: dict[str, Any]) -> str:
    parts = [f"{path.rsplit('.', 1)[-1]}={_short(v)}" for path, v in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", "_".join(parts))


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _design(spec: Spec, doc: YamlDoc) -> list[tuple[str, dict[str, Any], str]]:
    """(arm name, the values it sets, the YAML field they were written at)."""
    ind = spec.independent
    if ind.arms is not None:
        return [(name, dict(values), f"independent.arms.{name}") for name, values in ind.arms.items()]
    kind = "grid" if ind.grid is not None else "zip"
    table: dict[str, list[Any]] = getattr(ind, kind)
    if kind == "grid":
        combos = [dict(zip(table, vals, strict=True)) for vals in itertools.product(*table.values())]
    else:
        lengths = {k: len(v) for k, v in table.items()}
        if len(set(lengths.values())) > 1:
            raise doc.error("independent.zip", f"zip lists must have equal lengths, got {lengths}")
        combos = [dict(zip(table, vals, strict=True)) for vals in zip(*table.values(), strict=True)]
    if ind.names is not None:
        if len(ind.names) != len(combos):
            raise doc.error("independent.names",
                            f"{len(ind.names)} names for {len(combos)} arms")
        names = list(ind.names)
    else:
        names = [_arm_name(c) for c in combos]
    return [(n, c, f"independent.{kind}") for n, c in zip(names, combos, strict=True)]


def _check_path(doc: YamlDoc, where: str, path: str, leaves: dict[str, Any]) -> None:
    if path in NOT_INDEPENDENT:
        raise doc.error(where, f"'{path}' cannot be an independent variable: {NOT_INDEPENDENT[path]}")
    if path.split(".", 1)[0] not in VARIABLE_SECTIONS:
        raise doc.error(where, f"'{path}' cannot be an independent variable: only "
                        f"{', '.join(s + '.*' for s in VARIABLE_SECTIONS)} can change between arms "
                        "(the budget is fixed by comparison_axis)")
    if path not in leaves:
        close = [p for p in leaves if p.endswith("." + path.rsplit(".", 1)[-1])]
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        raise doc.error(where, f"unknown variable '{path}'{hint}")


def expand(spec: Spec, doc: YamlDoc, seeds: Sequence[int] | None = None, *,
           tuning: dict[str, list[Point]] | None = None,
           selected: dict[str, Point] | None = None) -> Plan:
    """The plan of ``spec``: every arm x every seed of ``seeds`` (default ``meta.seeds``; an
    until-settled experiment passes the seeds of the rounds it has started).

    With nuisance variables: every arm's tuning runs at each of its points (``tuning``, default
    the search's grid) x the tuning seeds, and its confirmation runs only once ``selected``
    names its point (the driver selects from the tuning runs' results)."""
    seeds = list(spec.meta.seeds if seeds is None else seeds)
    ind = spec.independent
    controlled = spec.controlled.model_dump(mode="json", include=set(VARIABLE_SECTIONS))
    leaves = flatten(controlled)
    design = _design(spec, doc)

    # ---- declared variables, and what each arm sets -------------------------------------------
    written = {p for _, values, _ in design for p in values}
    declared = set(ind.variables) if ind.variables else written | set(ind.derived)
    for path in ind.variables:
        _check_path(doc, "independent.variables", path, leaves)
    for _, values, where in design:
        for path in values:
            _check_path(doc, f"{where}.{path}", path, leaves)
    for path, text in ind.derived.items():
        _check_path(doc, f"independent.derived.{path}", path, leaves)
        try:
            for name in expr.names(text):
                if name not in leaves:
                    raise expr.ExprError(f"unknown variable {name!r} in {text!r}")
        except expr.ExprError as e:
            raise doc.error(f"independent.derived.{path}", str(e)) from None
    nuisance = ind.nuisance
    if nuisance is not None:
        for path in nuisance.search:
            where = f"independent.nuisance.search.{path}"
            _check_path(doc, where, path, leaves)
            if path in written or path in ind.derived:
                raise doc.error(where, f"'{path}' is tuned per arm (nuisance), so no arm sets "
                                "it and no derived expression computes it")
        clash = sorted(set(nuisance.seeds) & set(seeds))
        if clash:
            raise doc.error("independent.nuisance.seeds", f"tuning seeds {clash} are also "
                            "confirmation seeds (meta.seeds): a value selected on a seed's run "
                            "and confirmed on that same seed would carry its luck into the "
                            "verdict; pick tuning seeds of their own")
        # The nuisance paths differ between tuning runs on purpose, and so do the derived
        # values computed from them (warmup from the learning rate).
        declared |= set(nuisance.search) | {
            p for p, text in ind.derived.items() if set(expr.names(text)) & set(nuisance.search)}

    _check_addendum_conditions(spec, doc, design, declared)

    arm_names = [name for name, _, _ in design]
    duplicates = {n for n in arm_names if arm_names.count(n) > 1}
    if duplicates:
        raise doc.error("independent", f"arm names must be unique: {sorted(duplicates)}")
    units = nuisance_units(spec, design, tuning, selected)

    # ---- one resolved config tree per arm --------------------------------------------------------
    evaluation = spec.evaluation.model_dump(mode="json", exclude={"primary_metric"})
    arm_trees: dict[str, dict[str, Any]] = {}
    arm_values: dict[str, dict[str, Any]] = {}
    for unit in units:
        name, values, where, arm = unit.key, unit.values, unit.where, unit.label
        tree = copy.deepcopy(controlled)
        for path, value in values.items():
            set_path(tree, path, value)
        current = flatten(tree)
        for path, text in ind.derived.items():
            try:
                value = expr.evaluate(text, current)
            except expr.ExprError as e:
                raise doc.error(f"independent.derived.{path}", f"{arm}: {e}") from None
            if isinstance(leaves[path], int) and not isinstance(leaves[path], bool):
                if abs(value - round(value)) > 1e-9:
                    raise doc.error(f"independent.derived.{path}",
                                    f"{arm}: '{path}' must be a whole number, got {value:g}")
                value = round(value)
            set_path(tree, path, value)
            current[path] = value
        arm_trees[name] = tree
        arm_values[name] = {**values, **{p: current[p] for p in ind.derived}}
        mcfg, tcfg = tree["model"], tree["train"]
        if mcfg["attention"] == "sdpa" and mcfg["sdpa_backend"] == "flash" and \
                tcfg["precision"] == "fp32":
            # On CUDA the pinned kernel would refuse every step (on CPU the pin is not applied).
            raise doc.error(
                next((f"{where}.{p}" for p in ("model.sdpa_backend", "train.precision")
                      if p in values), "controlled.model.sdpa_backend"),
                f"{arm}: model.sdpa_backend 'flash' has no fp32 kernel (FlashAttention "
                "runs fp16/bf16): use train.precision bf16 or fp16, or sdpa_backend efficient, "
                "math or auto")
        # An error is blamed on the exact field: a derived value first (it is the one computed,
        # not written), then the arm's own values, else the controlled field it is about.
        written = {p: f"independent.derived.{p}" for p in ind.derived} | \
            {p: f"{where}.{p}" for p in values}
        try:  # once per arm, derived values included
            probe = RunConfig.model_validate({**tree, "evaluation": evaluation, "budget": {
                "steps": 1, "max_memory_mb": spec.budget.max_memory_mb}})
        except ValidationError as e:
            err = e.errors()[0]
            fields = error_fields(err)
            field, path = _blame(fields, written)
            got = f" (got {arm_values[name][path]!r})" if path else ""
            # A check across fields names them itself; otherwise say which field it is.
            which = "" if (err.get("ctx") or {}).get("fields") or not fields else f"{fields[0]}: "
            raise doc.error(field, f"{arm}: {which}"
                            f"{err['msg'].removeprefix('Value error, ')}{got}") from None
        # What cannot fit budget.max_memory_mb, or this machine when the spec is for any
        # hardware or the CPU, is refused before anything runs (a GPU spec is checked against
        # its device by `lmlab plan` and `run`).
        here = spec.controlled.hardware in ("any", "cpu", "")
        too_big = check_fits(probe, capacity=host_memory_bytes() if here else None)
        if too_big is not None:
            raise doc.error(_blame([too_big.field], written)[0], f"{arm}: {too_big.message}")

    # ---- the controls: only declared variables may differ -------------------------------------
    flat = {name: flatten(tree) for name, tree in arm_trees.items()}
    first = arm_names[0]
    keys = [u.key for u in units]
    for path in leaves:
        seen = {u.key: flat[u.key][path] for u in units}
        if len({repr(v) for v in seen.values()}) > 1 and path not in declared:
            named = {}  # one entry per arm: a tuning sweep differs in its nuisance values only
            for u in units:
                named.setdefault(u.arm, seen[u.key])
            listing = ", ".join(f"{n}: {v!r}" for n, v in named.items())
            culprit = next(k for k in keys if seen[k] != seen[keys[0]]) if len(keys) > 1 \
                else keys[0]
            where = next(u.where for u in units if u.key == culprit)
            raise doc.error(
                where,
                f"'{path}' differs between arms ({listing}) but is not declared independent: "
                "add it to independent.variables (coupled variables are declared together) or "
                "keep it frozen")

    # ---- references used by checks and the reference arm ---------------------------------------
    reference = ind.reference or first
    if reference not in arm_names:
        raise doc.error("independent.reference", f"unknown arm '{reference}' (arms: {arm_names})")
    for where, check in spec_checks(spec):
        for key in ("arm", "than"):
            arm = getattr(check, key)
            if arm is not None and arm not in arm_names:
                raise doc.error(f"{where}.{key}",
                                f"unknown arm '{arm}' (arms: {', '.join(arm_names)})")
    _check_analysis(spec, doc)

    # ---- budgets by comparison axis, then arms x seeds ------------------------------------------
    tuned = set(nuisance.search) if nuisance else set()
    tuned |= {p for p in declared & set(ind.derived) if tuned & set(expr.names(ind.derived[p]))}
    shown = {}  # arm -> its values: at its selected point, else without the tuned ones
    for u in units:
        if u.role == Role.CONFIRMATION:
            shown[u.arm] = arm_values[u.key]
        else:
            shown.setdefault(u.arm, {p: v for p, v in arm_values[u.key].items() if p not in tuned})
    plan = Plan(spec=spec, doc=doc, arms={n: shown[n] for n in arm_names},
                variables=sorted(declared | set(ind.derived)), reference=reference,
                tuning={n: [u.point for u in units if u.arm == n and u.role == Role.TUNING]
                        for n in arm_names} if nuisance else {},
                selected=dict(selected or {}) if nuisance else {})
    cadence = spec.cadence.model_dump(mode="json")
    for unit in units:
        name = unit.arm
        budget, eval_cfg = resolve_budget(spec, doc, name, arm_trees[unit.key], evaluation)
        tuning_run = unit.role == Role.TUNING
        for seed in (nuisance.seeds if tuning_run and nuisance else seeds):
            tree = copy.deepcopy(arm_trees[unit.key])
            tree["train"].update(seed=seed, **seed_parts(spec.controlled.seed_policy, name, seed))
            cfg = RunConfig.model_validate({**tree, "budget": budget, "evaluation": eval_cfg,
                                            "cadence": cadence})
            rid = tuning_run_id(name, unit.point, seed) if tuning_run else run_id(name, seed)
            plan.runs.append(PlannedRun(run_id=rid, arm=name, seed=seed, config=cfg,
                                        values=arm_values[unit.key], role=unit.role,
                                        point=dict(unit.point)))
    for where, check in spec_checks(spec):
        if check.curve is not None:
            check_window(spec, doc, plan, f"{where}.curve", check)
    return plan


def _blame(fields: list[str], written: dict[str, str]) -> tuple[str, str | None]:
    """(the spec field to point at, the arm's path it matched) for an error about ``fields``
    (RunConfig paths): an arm's own or derived value at, under or over one of them, else the
    first field in ``controlled``."""
    for f in fields:
        for path, spec_field in written.items():
            if path == f or path.startswith(f + ".") or f.startswith(path + "."):
                return spec_field, path
    return (f"controlled.{fields[0]}" if fields else "controlled"), None


def _check_analysis(spec: Spec, doc: YamlDoc) -> None:
    """The seed policy and the analysis section, against the design."""
    policy, a = spec.controlled.seed_policy, spec.analysis
    if policy.init != "per_seed" and policy.data_order != "per_seed" and \
            (len(spec.meta.seeds) > 1 or a.until_settled):
        raise doc.error("controlled.seed_policy", "fixes both init and data_order: every seed "
                        "would draw the same random numbers and repeat the same run; let one "
                        "of them vary per_seed, or run one seed")
    if a.until_settled:
        check_until_settled(spec, doc, a.max_seeds, "analysis.max_seeds")


def check_until_settled(spec: Spec, doc: YamlDoc, max_seeds: int | None, where: str) -> None:
    """An until-settled design needs something to settle and room to add seeds."""
    declared = len(spec.meta.seeds)
    if max_seeds is None:
        raise doc.error(where, "until_settled needs max_seeds: the cap on seeds per arm, fixed "
                        "before the first look (the boundaries depend on it)")
    if max_seeds <= declared:
        raise doc.error(where, f"max_seeds {max_seeds} leaves no room to add seeds to the "
                        f"{declared} declared in meta.seeds")
    if not any(True for _ in spec_checks(spec)):
        raise doc.error("hypothesis.checks", "until_settled adds seeds until every check is "
                        "settled: the spec states no checks")


def addendum_requested(spec: Spec) -> bool:
    """Whether the Memory / Systems addendum is asked for: ``systems_addendum: true``, or a
    ``category: memory`` spec that doesn't switch it off."""
    if spec.systems_addendum is not None:
        return spec.systems_addendum
    return spec.meta.category == "memory"


def _check_addendum_conditions(spec: Spec, doc: YamlDoc,
                               design: list[tuple[str, dict[str, Any], str]],
                               declared: set[str]) -> None:
    """The addendum's measurement conditions: fixed tokens per run (comparison_axis
    equal_tokens), the same seed (every arm runs meta.seeds) and the same effective batch."""
    if not addendum_requested(spec):
        return
    why = ("systems_addendum: true" if spec.systems_addendum else "category: memory") + \
        " asks for the Memory / Systems addendum, which"
    if spec.comparison_axis != "equal_tokens":
        raise doc.error("comparison_axis", f"{why} measures at fixed tokens per run: "
                        f"comparison_axis must be equal_tokens, not {spec.comparison_axis} "
                        "(or set systems_addendum: false)")
    ind = spec.independent
    for path in EFFECTIVE_BATCH_PATHS:
        if path not in declared and path not in ind.derived:
            continue
        where = next((f"{w}.{path}" for _, values, w in design if path in values), None)
        if path in ind.derived:
            where = f"independent.derived.{path}"
        raise doc.error(where or "independent.variables",
                        f"{why} compares arms at the same effective batch: '{path}' cannot be "
                        "an independent variable. Vary train.grad_accum to change the "
                        "micro-batch at a fixed batch_size (or set systems_addendum: false)")


