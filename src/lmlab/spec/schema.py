"""The experiment spec: the team's template (sections 0-7 and the Overfit Sanity preflight) as a
typed document. Field names in ``controlled`` and the dotted variable paths in ``independent`` are
the RunConfig's own (``lmlab.config``), so the spec *is* the config tree plus the science around it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmlab.config import (
    LEGACY_CADENCE_KEYS,
    BudgetConfig,
    CadenceConfig,
    Components,
    EvaluationConfig,
)
from lmlab.names import RUN_METRICS

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


class Check(_Section):
    """A machine-checkable form of the prediction, evaluated by the report.

    ``arm``'s metric compared with ``than`` (another arm) plus ``margin``, or with a fixed
    ``value``. ``op: equivalent`` claims no difference larger than ``margin`` (both directions).
    """

    name: str | None = None
    metric: Literal[tuple(RUN_METRICS)]  # type: ignore[valid-type]
    arm: str
    op: Literal["<", "<=", ">", ">=", "==", "equivalent"]
    than: str | None = None
    value: float | None = None
    margin: float = 0.0

    @model_validator(mode="after")
    def _one_reference(self) -> Check:
        if (self.than is None) == (self.value is None):
            raise ValueError("a check compares with exactly one of 'than' (an arm) or 'value'")
        if self.op == "equivalent" and (self.than is None or self.margin <= 0):
            raise ValueError("'equivalent' needs 'than' (an arm) and a positive 'margin'")
        return self

    def describe(self) -> str:
        if self.name:
            return self.name
        ref = f"{self.than}" if self.than else f"{self.value:g}"
        if self.op == "equivalent":
            return f"{self.metric}: {self.arm} within ±{self.margin:g} of {ref}"
        margin = f" {'+' if self.margin >= 0 else '-'} {abs(self.margin):g}" if self.margin else ""
        return f"{self.metric}: {self.arm} {self.op} {ref}{margin}"


class Hypothesis(_Section):
    mechanism: str
    prediction: str
    falsification: str
    checks: list[Check] = []


class Controlled(Components):
    """Section 3: everything frozen across arms: the RunConfig's component sections, plus the
    hardware expectation and the seed policy."""

    # The hardware the runs are meant for: "cpu", "cuda", a GPU name fragment ("H100"), or "any".
    hardware: str = "any"
    # Every arm runs every seed in meta.seeds; a seed fixes init, data order and dropout.
    seed_policy: Literal["same_seeds_all_arms"] = "same_seeds_all_arms"


class Independent(_Section):
    """Section 4: what changes. Exactly one of ``arms``, ``grid`` or ``zip`` (dotted RunConfig
    paths, e.g. ``optimizer.lr``); ``derived`` computes coupled values from the others."""

    variables: list[str] = []
    arms: dict[str, dict[str, object]] | None = None
    grid: dict[str, list[object]] | None = None
    zip: dict[str, list[object]] | None = None
    names: list[str] | None = None  # arm names for grid/zip (default: generated from the values)
    derived: dict[str, str] = {}
    reference: str | None = None  # the baseline arm (default: the first)

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


class Preflight(_Section):
    """The Overfit Sanity Template: a tiny fixed slice must be memorised."""

    enabled: bool = True
    sequences: int = Field(4, ge=1, description="dataset slice: the first N training windows")
    batch_size: int = Field(4, ge=1)
    steps: int = Field(150, ge=1)
    seq_len: int | None = Field(None, ge=2, description="default: the arms' seq_len")
    lr: float | None = Field(None, gt=0, description="default: the arm's lr")
    loss_threshold: float = Field(0.5, gt=0, description="pass: final train loss below this")


class Execution(_Section):
    """How the runs are executed, never what they are: a run's record is the same either way."""

    # Train runs of one shape (seeds, arms differing only in values that change no tensor
    # shape) together as one stacked model: auto, off, or at most N runs to a pack.
    pack: Literal["auto", "off"] | int = "off"

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
    expected_outcomes: list[str] | str
    preflight: Preflight = Preflight()
    systems_addendum: bool | None = None  # default: on for category memory
    execution: Execution = Execution()
