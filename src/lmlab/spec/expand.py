"""Spec -> Plan: arms x seeds, each a fully resolved RunConfig, with the controls enforced.

1. Arms come from ``independent`` (named arms, a grid or a zip), plus derived values computed by
   the safe expression language (``lmlab.spec.expr``).
2. Every arm's config is the frozen ``controlled`` tree with only that arm's values changed. Any
   difference between two arms in a variable that is not declared independent is refused.
3. The comparison axis fixes each run's budget (equal tokens, steps or training seconds); a budget
   the axis cannot honour is refused with the reason.
4. Every arm runs every seed of ``meta.seeds`` (and, run ``--until-settled``, the seeds of each
   further round), with the seed's parts (init, data order) set by ``controlled.seed_policy``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmlab.config import Components, RunConfig, TrainConfig, error_fields, flatten
from lmlab.identity import run_id
from lmlab.names import EFFECTIVE_BATCH_PATHS, PER_SEED_PATHS
from lmlab.spec import expr
from lmlab.spec.baseline import extend
from lmlab.spec.footprint import check_fits, host_memory_bytes
from lmlab.spec.load import YamlDoc, load_yaml, upgrade_spec_doc, validate
from lmlab.spec.schema import Check, SeedPolicy, Spec

# Sections of RunConfig an arm may change. Budgets are fixed by the axis, seeds by meta.seeds.
VARIABLE_SECTIONS = tuple(Components.model_fields)  # data, tokenizer, model, ..., train
NOT_INDEPENDENT = dict.fromkeys(PER_SEED_PATHS, "seeds are set by meta.seeds, the same for "
                                "every arm")


@dataclass(frozen=True)
class PlannedRun:
    """One (arm, seed) of an experiment, fully resolved."""

    run_id: str
    arm: str
    seed: int
    config: RunConfig
    values: dict[str, Any]  # the arm's independent (and derived) values, for tables


@dataclass
class Plan:
    spec: Spec
    doc: YamlDoc
    arms: dict[str, dict[str, Any]]  # arm -> its independent (and derived) values
    variables: list[str]  # declared independent paths, derived ones included
    reference: str
    runs: list[PlannedRun] = field(default_factory=list)

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
        return expand(spec, self.doc, seeds=sorted({r.seed for r in self.runs}))

    def to_json(self) -> dict[str, Any]:
        return {
            "axis": self.spec.comparison_axis,
            "reference": self.reference,
            "variables": self.variables,
            "runs": [
                {"run_id": r.run_id, "arm": r.arm, "seed": r.seed, "values": r.values,
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
    candidates = (s for s in itertools.count() if s not in used)
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


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[leaf] = value


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


def expand(spec: Spec, doc: YamlDoc, seeds: Sequence[int] | None = None) -> Plan:
    """The plan of ``spec``: every arm x every seed of ``seeds`` (default ``meta.seeds``; an
    until-settled experiment passes the seeds of the rounds it has started)."""
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

    _check_addendum_conditions(spec, doc, design, declared)

    arm_names = [name for name, _, _ in design]
    duplicates = {n for n in arm_names if arm_names.count(n) > 1}
    if duplicates:
        raise doc.error("independent", f"arm names must be unique: {sorted(duplicates)}")

    # ---- one resolved config tree per arm --------------------------------------------------------
    evaluation = spec.evaluation.model_dump(mode="json", exclude={"primary_metric"})
    arm_trees: dict[str, dict[str, Any]] = {}
    arm_values: dict[str, dict[str, Any]] = {}
    for name, values, where in design:
        tree = copy.deepcopy(controlled)
        for path, value in values.items():
            _set_path(tree, path, value)
        current = flatten(tree)
        for path, text in ind.derived.items():
            try:
                value = expr.evaluate(text, current)
            except expr.ExprError as e:
                raise doc.error(f"independent.derived.{path}", f"arm {name}: {e}") from None
            if isinstance(leaves[path], int) and not isinstance(leaves[path], bool):
                if abs(value - round(value)) > 1e-9:
                    raise doc.error(f"independent.derived.{path}",
                                    f"arm {name}: '{path}' must be a whole number, got {value:g}")
                value = round(value)
            _set_path(tree, path, value)
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
                f"arm {name}: model.sdpa_backend 'flash' has no fp32 kernel (FlashAttention "
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
            raise doc.error(field, f"arm {name}: {which}"
                            f"{err['msg'].removeprefix('Value error, ')}{got}") from None
        # What cannot fit budget.max_memory_mb, or this machine when the spec is for any
        # hardware or the CPU, is refused before anything runs (a GPU spec is checked against
        # its device by `lmlab plan` and `run`).
        here = spec.controlled.hardware in ("any", "cpu", "")
        too_big = check_fits(probe, capacity=host_memory_bytes() if here else None)
        if too_big is not None:
            raise doc.error(_blame([too_big.field], written)[0], f"arm {name}: {too_big.message}")

    # ---- the controls: only declared variables may differ -------------------------------------
    flat = {name: flatten(tree) for name, tree in arm_trees.items()}
    first = arm_names[0]
    for path in leaves:
        seen = {name: flat[name][path] for name in arm_names}
        if len({repr(v) for v in seen.values()}) > 1 and path not in declared:
            listing = ", ".join(f"{n}: {v!r}" for n, v in seen.items())
            culprit = next(n for n in arm_names if seen[n] != seen[first]) if len(arm_names) > 1 else first
            where = next(w for n, _, w in design if n == culprit)
            raise doc.error(
                where,
                f"'{path}' differs between arms ({listing}) but is not declared independent: "
                "add it to independent.variables (coupled variables are declared together) or "
                "keep it frozen")

    # ---- references used by checks and the reference arm ---------------------------------------
    reference = ind.reference or first
    if reference not in arm_trees:
        raise doc.error("independent.reference", f"unknown arm '{reference}' (arms: {arm_names})")
    for where, check in spec_checks(spec):
        for key in ("arm", "than"):
            arm = getattr(check, key)
            if arm is not None and arm not in arm_trees:
                raise doc.error(f"{where}.{key}",
                                f"unknown arm '{arm}' (arms: {', '.join(arm_names)})")
    _check_analysis(spec, doc)

    # ---- budgets by comparison axis, then arms x seeds ------------------------------------------
    plan = Plan(spec=spec, doc=doc, arms=arm_values,
                variables=sorted(declared | set(ind.derived)), reference=reference)
    cadence = spec.cadence.model_dump(mode="json")
    for name in arm_names:
        budget, eval_cfg = _resolve_budget(spec, doc, name, arm_trees[name], evaluation)
        for seed in seeds:
            tree = copy.deepcopy(arm_trees[name])
            tree["train"].update(seed=seed, **seed_parts(spec.controlled.seed_policy, name, seed))
            cfg = RunConfig.model_validate({**tree, "budget": budget, "evaluation": eval_cfg,
                                            "cadence": cadence})
            plan.runs.append(PlannedRun(run_id=run_id(name, seed), arm=name, seed=seed,
                                        config=cfg, values=arm_values[name]))
    for where, check in spec_checks(spec):
        if check.curve is not None:
            _check_window(spec, doc, plan, f"{where}.curve", check)
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


AXIS_UNIT = {"equal_tokens": "tokens", "equal_steps": "steps", "equal_wall_clock": "seconds"}


def _check_window(spec: Spec, doc: YamlDoc, plan: Plan, where: str, check: Check) -> None:
    """A curve statistic's window: on the comparison axis, ordered, inside the budget, and for
    an evaluation curve holding at least one evaluation."""
    curve = check.curve
    assert curve is not None
    axis = AXIS_UNIT[spec.comparison_axis]
    unit = curve.unit
    if unit is None:
        return
    field = f"{where}.{unit}"
    if unit != axis:
        per_step = {r.config.train.tokens_per_step for r in plan.runs}
        ramps = any(max(r.config.train.seq_len_warmup_steps, r.config.train.batch_ramp_steps)
                    for r in plan.runs)
        hint = ""
        if {unit, axis} == {"tokens", "steps"} and len(per_step) == 1 and not ramps:
            k = per_step.pop()
            lo, hi = curve.window  # type: ignore[misc]
            conv = [(b if isinstance(b, str) else f"{b * k:g}" if unit == "steps" else
                     f"{b / k:g}") for b in (lo, hi)]
            hint = (f": every arm takes {k:,} tokens per step, so write {axis}: "
                    f"[{conv[0]}, {conv[1]}]")
        raise doc.error(field, f"windows are on the comparison axis ({spec.comparison_axis}: "
                        f"{axis}), so that every arm is measured at the same amount of training"
                        f"{hint}")
    total = {"tokens": spec.budget.tokens, "steps": spec.budget.steps,
             "seconds": spec.budget.wall_clock_s}[axis]
    lo, hi = curve.bounds(total)
    if lo < 0 or hi < 0:
        raise doc.error(field, f"a window cannot start or end before 0 (got [{lo:g}, {hi:g}])")
    if lo >= hi:
        raise doc.error(field, f"the window is empty: it must start before it ends "
                        f"(got [{lo:g}, {hi:g}])")
    if total is not None and hi > total * (1 + 1e-9):
        raise doc.error(field, f"the window ends at {hi:,g} {axis}, after the budget's "
                        f"{total:,g}")
    if curve.metric.startswith("test_") and hi < total:  # type: ignore[operator]
        raise doc.error(field, f"{curve.metric} is measured once, at the end of the run: the "
                        "window must reach the end of the budget")
    if curve.metric.startswith("val_") and total is not None:
        e = spec.evaluation
        every = {"tokens": e.every_tokens, "steps": e.every_steps, "seconds": e.every_seconds}[axis]
        if every:
            # Evaluations happen at 0, at every multiple of the cadence, and at the end; a
            # window (lo, hi] holds the first multiple after lo.
            first = (math.floor(lo / every + 1e-9) + 1) * every
            if not (lo <= 0 or first <= hi or hi >= total):
                raise doc.error(field, f"the window [{lo:,g}, {hi:,g}] holds no evaluation of "
                                f"{curve.metric} (every {every:,g} {axis}): widen it")


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


def _steps_for_tokens(train: TrainConfig, tokens: int) -> int | None:
    """The whole number of steps that sees exactly ``tokens`` tokens, or None."""
    ramp_steps = max(train.seq_len_warmup_steps, train.batch_ramp_steps)
    ramp_tokens = train.tokens_after(ramp_steps)
    if tokens < ramp_tokens:
        return next((s for s in range(ramp_steps + 1) if train.tokens_after(s) == tokens), None)
    rest = tokens - ramp_tokens
    per_step = train.tokens_per_step
    return ramp_steps + rest // per_step if rest % per_step == 0 else None


# Per comparison axis: the budget field it needs, what it gives every arm, and what another
# budget field would do to that promise.
AXIS_BUDGET = {
    "equal_tokens": ("tokens", "derives each arm's steps from budget.tokens",
                     "end arms at different token counts"),
    "equal_steps": ("steps", "gives every arm budget.steps", "end arms at different step counts"),
    "equal_wall_clock": ("wall_clock_s", "gives every arm the same training seconds",
                         "stop arms early"),
}


def _resolve_budget(spec: Spec, doc: YamlDoc, arm: str, tree: dict[str, Any],
                    evaluation: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    b, axis = spec.budget, spec.comparison_axis
    train = TrainConfig.model_validate(tree["train"])
    budget: dict[str, Any] = {"max_memory_mb": b.max_memory_mb}
    eval_cfg = dict(evaluation)
    needed, gives, breaks = AXIS_BUDGET[axis]
    if getattr(b, needed) is None:
        raise doc.error(f"budget.{needed}", f"comparison_axis {axis} needs budget.{needed}")
    for other in ("tokens", "steps", "wall_clock_s"):
        if other != needed and getattr(b, other) is not None:
            raise doc.error(f"budget.{other}", f"{axis} {gives}; a budget.{other} would {breaks}: "
                            "remove it")
    if axis == "equal_tokens":
        steps = _steps_for_tokens(train, b.tokens)
        if steps is None:
            per_step = train.tokens_per_step
            lo = b.tokens // per_step * per_step
            raise doc.error("budget.tokens",
                            f"arm {arm}: {b.tokens:,} tokens is not a whole number of steps of "
                            f"{per_step:,} tokens (batch_size {train.batch_size} x seq_len "
                            f"{train.seq_len}); try {lo:,} or {lo + per_step:,}, or a multiple "
                            "of every arm's tokens per step")
        budget.update(tokens=b.tokens, steps=steps)
    elif axis == "equal_steps":
        budget.update(steps=b.steps, tokens=train.tokens_after(b.steps))
    else:  # equal_wall_clock
        if evaluation["every_tokens"] or evaluation["every_steps"]:
            raise doc.error("evaluation", "equal_wall_clock evaluates at the same wall-clock points: "
                            "use evaluation.every_seconds, not every_tokens/every_steps")
        budget.update(wall_clock_s=b.wall_clock_s)
        eval_cfg["every_seconds"] = evaluation["every_seconds"] or b.wall_clock_s / 10
    if budget.get("steps") is not None and budget["steps"] < 1:
        raise doc.error("budget", f"arm {arm}: the budget is less than one step")
    return budget, eval_cfg
