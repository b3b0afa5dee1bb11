"""Baselines: a decision carried from one experiment into the next.

``lmlab adopt DIR`` writes a baseline file (:class:`BaselineFile`): the experiment's controlled
tree with the adopted arm's values applied, and where it came from. A later spec starts from it
with ``controlled: {extends: PATH, ...overrides}`` (PATH relative to the spec file): the
baseline's tree is the base and the spec's keys override it, mapping by mapping (a list or a
value is replaced whole). :func:`extend` does that to a spec's document before it is validated,
so the spec that is validated, expanded and stored is the resolved tree; an error in a value the
spec inherited names the baseline file and the line it was written on (``YamlDoc.where``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lmlab.config import flatten
from lmlab.errors import UserError
from lmlab.spec.load import YamlDoc, load_yaml, validate

FORMAT = 1  # BaselineFile.lmlab_baseline
EXTENDS = "extends"
# Path-valued settings: relative ones are relative to the file that wrote them, so an inherited
# one is made absolute against the baseline's folder (the spec extending it may live elsewhere).
PATH_FIELDS = ("data.path", "tokenizer.path", "train.init_from")


class Origin(BaseModel):
    """Where a baseline came from: the experiment, its decision and the code that ran it."""

    model_config = ConfigDict(extra="allow")  # later lmlab versions may record more

    experiment: str
    directory: str
    arm: str
    selected_by: str  # "best" (the report's decision) or "--arm"
    verdict: str
    verdict_reason: str = ""
    decision: list[str] = []
    phase1: str = ""
    report: str | None = None
    spec_path: str | None = None
    spec_hash: str | None = None
    lmlab_version: str | None = None
    git_commit: str | None = None
    git_branch: str | None = None
    git_dirty: bool | None = None
    adopted_at: str
    adopted_with: str  # the lmlab version that wrote the file


class BaselineFile(BaseModel):
    """A baseline file as ``lmlab adopt`` writes it."""

    model_config = ConfigDict(extra="forbid")

    lmlab_baseline: Literal[1]
    provisional: bool
    origin: Origin
    adopted: dict[str, Any]  # the arm's values (dotted paths) applied to the tree below
    controlled: dict[str, Any]

    def describe(self) -> str:
        o = self.origin
        return (f"adopted from {o.experiment} ({o.directory}), arm {o.arm}, verdict {o.verdict}"
                + (", PROVISIONAL" if self.provisional else "") + f", on {o.adopted_at[:10]}")


@dataclass(frozen=True)
class Inheritance:
    """What a spec took from its baseline: the file, its digest, and which settings (dotted
    paths under ``controlled``) it inherited and which it overrode."""

    path: Path  # as the spec wrote it, resolved against the spec's folder
    written: str  # as the spec wrote it
    digest: str
    baseline: BaselineFile
    inherited: list[str]
    overridden: dict[str, tuple[Any, Any]]  # path -> (the baseline's value, the spec's)

    def to_json(self) -> dict[str, Any]:
        """As the stored spec records it: enough to name the baseline in every later report,
        however the file changes afterwards."""
        return {"path": str(self.path), "written": self.written, "digest": self.digest,
                "provisional": self.baseline.provisional,
                "origin": self.baseline.origin.model_dump(mode="json"),
                "adopted": self.baseline.adopted,
                "inherited": len(self.inherited),
                "overridden": {k: list(v) for k, v in self.overridden.items()}}


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_baseline(path: Path | str) -> tuple[BaselineFile, YamlDoc]:
    doc = load_yaml(path)
    baseline = validate(doc, BaselineFile)
    if EXTENDS in baseline.controlled:
        raise doc.error(f"controlled.{EXTENDS}", "a baseline is a resolved tree: it cannot "
                        "extend another (adopt from the experiment that extended it)")
    return baseline, doc


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: mappings key by key, anything else replaced whole."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def extend(doc: YamlDoc) -> YamlDoc:
    """Resolve ``controlled.extends`` in a spec's document (in place): its controlled tree
    becomes the baseline's with the spec's keys merged over it. A spec without one is
    returned unchanged."""
    controlled = doc.data.get("controlled")
    if not isinstance(controlled, dict) or EXTENDS not in controlled:
        return doc
    written = controlled[EXTENDS]
    field = f"controlled.{EXTENDS}"
    if not isinstance(written, str) or not written.strip():
        raise doc.error(field, f"extends names a baseline file (written by lmlab adopt), got "
                        f"{written!r}")
    path = (doc.path.resolve().parent / Path(written).expanduser()).resolve()
    if not path.is_file():
        raise doc.error(field, f"no baseline file {path} (write one with `lmlab adopt DIR "
                        "--out PATH`; the path is relative to this spec)")
    with _named(doc, field):
        baseline, base_doc = load_baseline(path)
    overrides = {k: v for k, v in controlled.items() if k != EXTENDS}
    base_tree = absolute_paths(baseline.controlled, path.parent)
    doc.data["controlled"] = deep_merge(base_tree, overrides)
    base_flat, over_flat = flatten(base_tree), flatten(overrides)
    # Every key the spec writes overrides the baseline's, the same value or not: a value
    # restated is a choice the spec makes explicit, and is shown as such.
    overridden = {p: (base_flat.get(p), v) for p, v in over_flat.items()}
    inherited = [p for p in base_flat if p not in over_flat]
    doc.inherited, doc.extends = base_doc, Inheritance(
        path=path, written=written, digest=digest_of(path), baseline=baseline,
        inherited=inherited, overridden=overridden)
    return doc


def absolute_paths(tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``tree`` (a controlled tree) with its relative ``PATH_FIELDS`` taken from ``folder``."""
    out = copy.deepcopy(tree)
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] and \
                not Path(node[key]).expanduser().is_absolute():
            node[key] = str((folder / node[key]).resolve())
    return out


@contextmanager
def _named(doc: YamlDoc, field: str) -> Iterator[None]:
    """A baseline file's own problems (not YAML, not a baseline) keep its file and line; one
    without a location is said at the spec's ``extends`` line."""
    try:
        yield
    except UserError as e:
        if e.file is None:
            path, e.line = doc.where(field)
            e.file, e.field = str(path), field
        raise


def summary_lines(inheritance: Inheritance) -> list[str]:
    """What ``validate`` and ``plan`` print: the baseline, what was inherited, what overridden."""
    b = inheritance.baseline
    sections = sorted({p.split(".", 1)[0] for p in inheritance.inherited})
    lines = [f"baseline: {inheritance.path} (digest {inheritance.digest}) — {b.describe()}",
             f"  inherited: {len(inheritance.inherited)} settings of "
             f"{', '.join(sections) or 'nothing'}"
             + (f"; adopted there: {_values(b.adopted)}" if b.adopted else "")]
    changed = {p: v for p, v in inheritance.overridden.items() if v[0] != v[1]}
    same = [p for p in inheritance.overridden if p not in changed]
    lines.append("  overridden here: " + ("; ".join(
        f"controlled.{p} = {new!r} (baseline: {old!r})" for p, (old, new) in changed.items())
        or "nothing"))
    if same:
        lines.append(f"  restated here with the baseline's value: {', '.join(same)}")
    return lines


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in values.items())
