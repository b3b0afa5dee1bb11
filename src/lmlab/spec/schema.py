"""The experiment spec: the team's template (sections 0-7 and the Overfit Sanity preflight) as a
typed document. Field names in ``controlled`` and the dotted variable paths in ``independent`` are
the RunConfig's own (``lmlab.config``), so the spec *is* the config tree plus the science around it.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmlab.config import (
    LEGACY_CADENCE_KEYS,
    BudgetConfig,
    CadenceConfig,
    Components,
    EvaluationConfig,
)
from lmlab.names import (
    CURVE_EVENTS,
    EVAL_KEYS,
    EVENT_METRICS,
    LOGGED_CURVES,
    RUN_METRICS,
    logged_curve,
)

Category = Literal["hyperparam", "optimizer", "memory", "architecture", "recipe"]
Axis = Literal["equal_tokens", "equal_steps", "equal_wall_clock"]

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Meta(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    category: Category
    seeds: list[int] = Field(default=[0], min_length=1)
    description: str | None = None

    @model_validator(mode="after")
    def _unique_seeds(self) -> Meta:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self


# A window bound: a number on the comparison axis (tokens, steps or training seconds) or a share
# of the run's budget on it, written as a percentage ("90%").
Bound = float | str
# Reducers of a window of one logged curve; ``count`` counts events (spike, nan, divergence).
Reducer = Literal["mean", "min", "max", "first", "last", "count", "first_below", "first_above"]
WINDOW_UNITS = ("tokens", "steps", "seconds")


class CurveStat(_Section):
    """One number per run read off a logged curve: ``reduce`` over a window of ``metric``.

    The window is on the comparison axis (``tokens``, ``steps`` or ``seconds``, whichever the
    experiment compares arms at), as ``[from, to]`` with numbers or percentages of the budget;
    without one, the whole run. ``first_below`` / ``first_above`` give the position on the axis
    where the metric first reaches ``threshold`` (the tokens to reach a validation loss);
    ``count`` counts events (``spike``, ``nan``, ``divergence``) in the window.
    """

    metric: str
    reduce: Reducer
    threshold: float | None = None
    tokens: tuple[Bound, Bound] | None = None
    steps: tuple[Bound, Bound] | None = None
    seconds: tuple[Bound, Bound] | None = None

    @field_validator(*WINDOW_UNITS)
    @classmethod
    def _bounds(cls, window: tuple[Bound, Bound] | None) -> tuple[Bound, Bound] | None:
        for bound in window or ():
            if isinstance(bound, str) and not re.fullmatch(r"\d+(\.\d+)?\s*%", bound.strip()):
                raise ValueError(f"a window bound is a number or a percentage of the budget "
                                 f"such as '90%', not {bound!r}")
        return window

    @model_validator(mode="after")
    def _consistent(self) -> CurveStat:
        windows = [u for u in WINDOW_UNITS if getattr(self, u) is not None]
        if len(windows) > 1:
            raise ValueError(f"give one window, not {' and '.join(windows)}")
        events = self.metric in CURVE_EVENTS
        if events and self.reduce != "count":
            raise ValueError(f"{self.metric!r} is an event: it is counted (reduce: count)")
        if self.reduce == "count" and not events:
            raise ValueError(f"'count' counts events ({', '.join(CURVE_EVENTS)}), not a curve "
                             f"like {self.metric!r}")
        if not events and not logged_curve(self.metric):
            raise ValueError(f"unknown curve {self.metric!r}: a logged metric ("
                             f"{', '.join(LOGGED_CURVES)}, val_*/test_* of "
                             f"{', '.join(EVAL_KEYS)}, or a diagnostic such as grad_norm/block.0) "
                             f"or an event ({', '.join(CURVE_EVENTS)})")
        reaching = self.reduce in ("first_below", "first_above")
        if reaching != (self.threshold is not None):
            raise ValueError(f"{self.reduce} needs a threshold" if reaching else
                             f"a threshold belongs to first_below / first_above, not {self.reduce}")
        return self

    def bounds(self, total: float | None) -> tuple[float, float]:
        """The window as numbers on the axis, percentages taken of ``total`` (the run's budget
        on the axis; None when unknown: then a percentage bound is open). No window: the whole
        run."""
        if self.window is None:
            return 0.0, math.inf
        out = []
        for i, b in enumerate(self.window):
            if isinstance(b, str):
                share = float(b.strip().rstrip("%")) / 100
                out.append(share * total if total is not None else (0.0, math.inf)[i])
            else:
                out.append(float(b))
        return out[0], out[1]

    @property
    def unit(self) -> str | None:
        return next((u for u in WINDOW_UNITS if getattr(self, u) is not None), None)

    @property
    def window(self) -> tuple[Bound, Bound] | None:
        return getattr(self, self.unit) if self.unit else None

    def describe(self) -> str:
        if self.reduce == "count":
            what = f"{self.metric} events"
        elif self.threshold is not None:
            sign = "<=" if self.reduce == "first_below" else ">="
            what = f"{self.unit or 'axis position'} until {self.metric} {sign} {self.threshold:g}"
        else:
            what = f"{self.reduce} {self.metric}"
        if self.window is None:
            return what
        lo, hi = (_bound_text(b) for b in self.window)
        return f"{what} over {self.unit} [{lo}, {hi}]"


def _bound_text(b: Bound) -> str:
    return b if isinstance(b, str) else f"{b:,.6g}"


class Check(_Section):
    """A machine-checkable form of the prediction, evaluated by the report.

    ``arm``'s ``metric`` (a per-run quantity, ``names.RUN_METRICS``) or ``curve`` (a statistic
    of a logged curve, :class:`CurveStat`) compared with ``than`` (another arm) plus
    ``margin``, or with a fixed ``value``. ``op: equivalent`` claims no difference larger than
    ``margin`` (both directions).
    """

    name: str | None = None
    metric: Literal[tuple(RUN_METRICS)] | None = None  # type: ignore[valid-type]
    curve: CurveStat | None = None
    arm: str
    op: Literal["<", "<=", ">", ">=", "==", "equivalent"]
    than: str | None = None
    value: float | None = None
    margin: float = 0.0

    @model_validator(mode="after")
    def _one_reference(self) -> Check:
        if (self.metric is None) == (self.curve is None):
            raise ValueError("a check measures exactly one of 'metric' (a per-run quantity) or "
                             "'curve' (a statistic of a logged curve)")
        if (self.than is None) == (self.value is None):
            raise ValueError("a check compares with exactly one of 'than' (an arm) or 'value'")
        if self.op == "equivalent" and (self.than is None or self.margin <= 0):
            raise ValueError("'equivalent' needs 'than' (an arm) and a positive 'margin'")
        return self

    @property
    def measure(self) -> str:
        """What is measured per run, as a reader names it."""
        return self.metric if self.curve is None else self.curve.describe()

    @property
    def counts_events(self) -> bool:
        """Whether each run's value is a count of events: an exact observation per run."""
        return self.metric in EVENT_METRICS if self.curve is None else self.curve.reduce == "count"

    def describe(self) -> str:
        return self.name or self.formula()

    def label(self) -> str:
        """As a reader needs it: its name (if any) and always the comparison itself."""
        return f"{self.name} ({self.formula()})" if self.name else self.formula()

    def formula(self) -> str:
        """The comparison itself, whatever the check is named."""
        ref = f"{self.than}" if self.than else f"{self.value:g}"
        if self.op == "equivalent":
            return f"{self.measure}: {self.arm} within ±{self.margin:g} of {ref}"
        margin = f" {'+' if self.margin >= 0 else '-'} {abs(self.margin):g}" if self.margin else ""
        return f"{self.measure}: {self.arm} {self.op} {ref}{margin}"


class Hypothesis(_Section):
    mechanism: str
    prediction: str
    falsification: str
    checks: list[Check] = []


class SeedPolicy(_Section):
    """What a seed fixes. Every arm runs every seed of ``meta.seeds``; a seed fixes the weights'
    initialisation (and dropout) and the order of the training windows.

    ``streams: shared`` (common random numbers): seed s of every arm draws the same random
    numbers, so two arms are compared seed by seed (paired) and the seed noise they share
    cancels. ``per_arm``: each arm draws its own from (arm, seed): the arms are independent
    samples (unpaired). ``init`` and ``data_order`` vary with the seed (``per_seed``) or are held
    at one seed value in every run: a fixed data order isolates initialisation noise.
    """

    streams: Literal["shared", "per_arm"] = "shared"
    init: Literal["per_seed"] | int = "per_seed"
    data_order: Literal["per_seed"] | int = "per_seed"

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: object) -> object:
        # lmlab 0.1 and 0.2 had one policy, written as a name: every part per seed, shared.
        return {} if data == "same_seeds_all_arms" else data

    @property
    def shares_random_numbers(self) -> bool:
        return self.streams == "shared"

    def describe_part(self, part: Literal["init", "data_order"]) -> str:
        value = getattr(self, part)
        if value != "per_seed":
            return f"fixed at seed {value} in every run"
        return "per seed, shared by the arms" if self.shares_random_numbers else \
            "per seed and per arm"


class Controlled(Components):
    """Section 3: everything frozen across arms: the RunConfig's component sections, plus the
    hardware expectation and the seed policy."""

    # The hardware the runs are meant for: "cpu", "cuda", a GPU name fragment ("H100"), or "any".
    hardware: str = "any"
    seed_policy: SeedPolicy = SeedPolicy()


class SearchRange(_Section):
    """A nuisance variable's search values as a range: ``points`` values from ``min`` to
    ``max``, evenly spaced, or log-spaced (``log: true``, the usual learning-rate grid)."""

    min: float
    max: float
    points: int = Field(ge=2)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.min < self.max:
            raise ValueError(f"min must be below max, got {self.min:g} and {self.max:g}")
        if self.log and self.min <= 0:
            raise ValueError(f"a log range needs min > 0, got {self.min:g}")
        return self

    def values(self) -> list[float]:
        if self.log:
            lo, hi = math.log(self.min), math.log(self.max)
            out = [math.exp(lo + (hi - lo) * i / (self.points - 1)) for i in range(self.points)]
        else:
            out = [self.min + (self.max - self.min) * i / (self.points - 1)
                   for i in range(self.points)]
        return [float(f"{v:.6g}") for v in out]  # 1e-3, not 0.0010000000000000002


# What selects a nuisance value: a validation metric, never a test-split one (the test split
# is for the final comparison, and a value chosen on it would be fitted to it).
SELECT_METRICS = tuple(m for m in RUN_METRICS if m.startswith("final_val") or m == "min_val_loss")


class Nuisance(_Section):
    """Variables tuned separately for every arm (the tuning playbook's *nuisance* kind): each
    arm first runs a sweep over ``search`` (dotted paths with a list of values or a
    :class:`SearchRange`; several paths: their grid) at the tuning ``seeds``, then its
    confirmation runs (every seed of ``meta.seeds``) at the value that was best by ``select``.
    ``extend``: when an arm's best value is at an edge of the range, add up to this many points
    beyond it, one at a time (one searched path only)."""

    search: dict[str, list[float | int | str | bool] | SearchRange] = Field(min_length=1)
    select: Literal[SELECT_METRICS] = "final_val_loss"  # type: ignore[valid-type]
    # Distinct from meta.seeds: a value selected on a seed's run, confirmed on that same seed,
    # would carry its luck into the verdict.
    seeds: list[int] = Field(default=[1000], min_length=1)
    extend: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Nuisance:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for path, values in self.search.items():
            if isinstance(values, list) and len(values) < 2:
                raise ValueError(f"{path}: a search needs at least 2 values")
            if isinstance(values, list) and len({repr(v) for v in values}) != len(values):
                raise ValueError(f"{path}: search values must be distinct")
        if self.extend and len(self.search) > 1:
            raise ValueError("extend adds points along one searched variable: search one path "
                             "(or set extend: 0)")
        if self.extend:
            (values,) = self.search.values()
            if isinstance(values, list) and not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise ValueError("extend needs numeric search values")
        return self

    def grid(self) -> dict[str, list[object]]:
        """Each searched path's values, in order (a range's from min to max)."""
        return {p: v.values() if isinstance(v, SearchRange) else list(v)
                for p, v in self.search.items()}

    def points(self) -> list[dict[str, object]]:
        """The first search's points: the grid of every path's values, in order."""
        grid = self.grid()
        return [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]

    def log_scale(self, path: str) -> bool:
        """Whether ``path``'s values are searched (and plotted, and extended) on a log scale: a
        log range, or a list of positive numbers with a constant ratio."""
        v = self.search[path]
        if isinstance(v, SearchRange):
            return v.log
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in v):
            return False
        s = sorted(float(x) for x in v)  # type: ignore[arg-type]
        ratios = [b / a for a, b in itertools.pairwise(s)]
        return min(ratios) >= 1.5 and max(ratios) / min(ratios) < 1.01


class Independent(_Section):
    """Section 4: what changes. Exactly one of ``arms``, ``grid`` or ``zip`` (dotted RunConfig
    paths, e.g. ``optimizer.lr``); ``derived`` computes coupled values from the others (a
    nuisance value included); ``nuisance``: what is tuned per arm before the comparison."""

    variables: list[str] = []
    arms: dict[str, dict[str, object]] | None = None
    grid: dict[str, list[object]] | None = None
    zip: dict[str, list[object]] | None = None
    names: list[str] | None = None  # arm names for grid/zip (default: generated from the values)
    derived: dict[str, str] = {}
    reference: str | None = None  # the baseline arm (default: the first)
    nuisance: Nuisance | None = None

    @model_validator(mode="after")
    def _one_design(self) -> Independent:
        given = [k for k in ("arms", "grid", "zip") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'arms', 'grid' or 'zip'")
        if self.arms is not None and not self.variables:
            raise ValueError("named arms need 'variables': the list of what is changed on purpose")
        return self


class Evaluation(EvaluationConfig):
    """Section 5's evaluation protocol and section 6's metrics to log (the runs'
    ``evaluation`` section), plus the metric the decision ranks arms by."""

    primary_metric: Literal[tuple(RUN_METRICS)] = "final_val_loss"  # type: ignore[valid-type]


class ExpectedOutcome(_Section):
    """Section 7: one outcome written down before running; with a ``check``, section 9 says
    whether it was met."""

    outcome: str
    check: Check | None = None


class Analysis(_Section):
    """How the report judges the checks (hypothesis and expected outcomes).

    ``pairing``: ``auto`` analyses two arms seed by seed (paired t) exactly when both ran the same
    seeds under a seed policy that shares random numbers, otherwise with Welch's test; decided
    from the design before any data is read. ``alpha``: family-wise over every statistical check
    of the experiment (Holm-Bonferroni). ``until_settled``: after the declared seeds, add
    ``seeds_per_round`` seeds to every arm per round until every check is supported or refuted,
    or ``max_seeds`` per arm; a group-sequential design (Lan-DeMets O'Brien-Fleming alpha
    spending) keeps the whole procedure at ``alpha``.
    """

    pairing: Literal["auto", "paired", "unpaired"] = "auto"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    until_settled: bool = False
    max_seeds: int | None = Field(None, ge=2, description="per arm: the cap of until_settled")
    seeds_per_round: int | None = Field(None, ge=1, description="default: as many as meta.seeds")


class Preflight(_Section):
    """The Overfit Sanity Template: a tiny fixed slice must be memorised."""

    enabled: bool = True
    sequences: int = Field(4, ge=1, description="dataset slice: the first N training windows")
    batch_size: int = Field(4, ge=1)
    steps: int = Field(150, ge=1)
    seq_len: int | None = Field(None, ge=2, description="default: the arms' seq_len")
    lr: float | None = Field(None, gt=0, description="default: the arm's lr")
    loss_threshold: float = Field(0.5, gt=0, description="pass: final train loss below this")


class SlurmOptions(_Section):
    """A thin layer over submitit's Slurm parameters (``lmlab.execute.slurm_backend``)."""

    # "slurm", or "local": submitit's local executor, each job a process of this machine (to
    # try the path out where there is no Slurm; lmlab's tests run it so).
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    time_min: int = Field(60, gt=0)  # the job's time limit, minutes
    account: str | None = None
    qos: str | None = None
    mem_gb: float | None = Field(None, gt=0)
    constraint: str | None = None  # default: controlled.hardware when it names a GPU type
    gres_type: str | None = None  # ask --gres=gpu:TYPE:N instead of a constraint
    additional: dict[str, str] = {}  # any other sbatch option, passed on as it is


class Execution(_Section):
    """How the runs are executed, never what they are: a run's record is the same either way."""

    # Train runs of one shape (seeds, arms differing only in values that change no tensor
    # shape) together as one stacked model: auto, off, or at most N runs to a pack.
    pack: Literal["auto", "off"] | int = "off"
    # Where the runs train (docs/cluster.md): this machine, a Ray cluster, or Slurm jobs; what
    # one unit (a run or a pack) asks the cluster for; and, for Slurm, the sbatch options.
    executor: Literal["local", "ray", "slurm"] = "local"
    cpus_per_run: float = Field(1.0, gt=0)
    gpus_per_run: float | None = Field(None, ge=0)  # default: 1 when controlled.hardware is a GPU
    slurm: SlurmOptions = Field(default_factory=lambda: SlurmOptions())

    @model_validator(mode="after")
    def _positive(self) -> Execution:
        if isinstance(self.pack, int) and self.pack < 1:
            raise ValueError(f"a pack holds at least 1 run, got {self.pack}")
        return self


class Spec(_Section):
    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: object) -> object:
        """A spec of lmlab 0.1 (a stored one: files are upgraded line by line as they load)
        kept the log and checkpoint cadences in ``evaluation``; today they are ``cadence``'s."""
        if not isinstance(data, dict) or not isinstance(data.get("evaluation"), dict):
            return data
        evaluation = dict(data["evaluation"])
        moved = {k: evaluation.pop(k) for k in LEGACY_CADENCE_KEYS if k in evaluation}
        if not moved:
            return data
        return {**data, "evaluation": evaluation,
                "cadence": {**moved, **(data.get("cadence") or {})}}

    meta: Meta
    objective: str
    hypothesis: Hypothesis
    controlled: Controlled = Controlled()
    independent: Independent
    budget: BudgetConfig
    evaluation: Evaluation = Evaluation()
    cadence: CadenceConfig = CadenceConfig()
    comparison_axis: Axis
    expected_outcomes: list[str | ExpectedOutcome] | str
    analysis: Analysis = Analysis()
    preflight: Preflight = Preflight()
    systems_addendum: bool | None = None  # default: on for category memory
    execution: Execution = Execution()
    # The researcher's own notes, as written before (or while) running; `lmlab note DIR` adds
    # more later, each with its time. Both are shown at the end of the report's section 10.
    notes: str | list[str] | None = None

    @property
    def note_list(self) -> list[str]:
        n = self.notes
        return [] if n is None else [n] if isinstance(n, str) else list(n)

    @property
    def outcomes(self) -> list[ExpectedOutcome]:
        """Section 7's entries, prose ones included (``check`` None)."""
        e = self.expected_outcomes
        return [x if isinstance(x, ExpectedOutcome) else ExpectedOutcome(outcome=x)
                for x in ([e] if isinstance(e, str) else e)]
