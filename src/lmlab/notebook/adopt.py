"""``lmlab adopt DIR``: an experiment's decision written down as a baseline file that the next
spec extends (``controlled: {extends: PATH}``, :mod:`lmlab.spec.baseline`).

The arm adopted is the report's (section 10: the best mean of the primary metric) unless
``--arm`` names another. A decision the report calls provisional (the verdict is not
"supported", or the best arm ties with others within noise) is adopted only with
``provisional=True``, and the file says so: the next experiment's report names its baseline as
provisional.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lmlab import __version__
from lmlab.analysis.summary import Experiment, load_experiment
from lmlab.config import set_path
from lmlab.errors import UserError
from lmlab.names import PER_SEED_PATHS, RESULT_ADOPTED_PREFIX
from lmlab.report.inputs import ReportInputs, gather
from lmlab.report.sections import decision, followups
from lmlab.spec.baseline import FORMAT, BaselineFile, Origin, absolute_paths, digest_of
from lmlab.store import Store

DEFAULT_FILE = "baseline.yaml"  # in the experiment's directory


@dataclass(frozen=True)
class Adopted:
    path: Path
    baseline: BaselineFile
    digest: str


def adopted_values(exp: Experiment, arm: str) -> dict[str, Any]:
    """The settings an adopted arm carries into the baseline, beyond the controlled tree: its
    independent (and derived) values, as dotted RunConfig paths, and the nuisance values its
    tuning selected (``RESULT_TUNING``: an arm adopted with its own best learning rate). The one
    place that decides what a decision adopts."""
    values = {p: v for p, v in exp.arm_values(arm).items() if p not in PER_SEED_PATHS}
    selected = ((exp.tuning_record or {}).get("selected") or {}).get(arm) or {}
    return values | dict(selected)


def provisional_reason(inputs: ReportInputs) -> str | None:
    """Why the report's decision is provisional, or None when it is not."""
    if inputs.verdict.overall != "supported":
        return f"the hypothesis verdict is {inputs.verdict.overall} ({inputs.verdict.reason})"
    if tied := [t.arm for t in inputs.findings.tied]:
        return f"the best arm {inputs.findings.best} ties with {', '.join(tied)} within noise"
    return None


def adopt(directory: Path | str, *, arm: str | None = None, provisional: bool = False,
          out: Path | None = None, force: bool = False) -> Adopted:
    directory = Path(directory)
    exp = load_experiment(directory)
    if exp.spec is None:
        raise UserError("no experiment spec is stored here (a single `lmlab train` run?): "
                        "there is no controlled tree to adopt", file=str(directory))
    inputs = gather(exp)
    chosen = arm or inputs.findings.best
    if chosen is None:
        raise UserError(f"no arm has a {inputs.primary} yet: nothing to adopt (let the runs "
                        "finish, or name one with --arm)", file=str(directory))
    if chosen not in exp.arms:
        raise UserError(f"no arm {chosen!r} in this experiment; its arms: "
                        f"{', '.join(exp.arms)}", file=str(directory), field="--arm")
    why = provisional_reason(inputs)
    if why is not None and not provisional:
        raise UserError(f"the decision is provisional: {why}. Adopt it anyway with "
                        "--provisional (the baseline records provisional: true), or settle it "
                        "first", file=str(directory), field="--provisional")
    values = adopted_values(exp, chosen)
    tree = exp.spec.controlled.model_dump(mode="json")
    for path, value in values.items():
        set_path(tree, path, value, create=True)
    # The stored spec's relative data / tokenizer / init paths were relative to its folder:
    # written absolute, so the baseline means the same files wherever it is read.
    tree = absolute_paths(tree, Path(str((exp.spec_record or {}).get("path") or "")).parent)
    path = out or directory / DEFAULT_FILE
    baseline = BaselineFile(lmlab_baseline=FORMAT, provisional=why is not None,
                            origin=_origin(inputs, directory, chosen, arm is not None),
                            adopted=values, controlled=tree)
    if path.exists() and not force:
        if _same_decision(path, baseline):  # adopted again: the file (and its digest) stays
            done = Adopted(path, BaselineFile.model_validate(_read(path)), digest_of(path))
            _record(directory, done)
            return done
        raise UserError("exists already, with another decision: a spec that extends it would "
                        "change (write another --out, or --force to replace it)", file=str(path))
    text = _text(baseline)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # never a half-written baseline
    done = Adopted(path, baseline, digest_of(path))
    _record(directory, done)
    return done


def _record(directory: Path, done: Adopted) -> None:
    """The experiment remembers the baselines adopted from it (the notebook names them, even
    when no later experiment under the same directory has extended them yet)."""
    with Store.existing(directory) as store:
        store.put_result(f"{RESULT_ADOPTED_PREFIX}{done.digest}", {
            "path": str(done.path.resolve()), "digest": done.digest,
            "arm": done.baseline.origin.arm, "provisional": done.baseline.provisional,
            "at": done.baseline.origin.adopted_at})


def _origin(inputs: ReportInputs, directory: Path, arm: str, by_option: bool) -> Origin:
    exp = inputs.exp
    provs = [r.provenance for r in exp.runs_of(arm) if r.provenance] or inputs.provenances
    prov = provs[0] if provs else {}
    rec = exp.spec_record or {}
    report = directory / "report.md"
    d = decision.section(inputs)
    return Origin(
        experiment=exp.name, directory=str(directory.resolve()), arm=arm,
        selected_by="--arm" if by_option else "best",
        verdict=inputs.verdict.overall, verdict_reason=inputs.verdict.reason,
        decision=[f"{it.label}: {it.value}" for it in d.items] + d.notes,
        phase1=" ".join(followups.section(inputs)[2].answers),
        report=str(report.resolve()) if report.is_file() else None,
        spec_path=rec.get("path"), spec_hash=rec.get("hash"),
        lmlab_version=prov.get("lmlab_version"), git_commit=prov.get("git_commit"),
        git_branch=prov.get("git_branch"), git_dirty=prov.get("git_dirty"),
        adopted_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), adopted_with=__version__)


def _text(baseline: BaselineFile) -> str:
    o = baseline.origin
    head = [f"# lmlab baseline: arm {o.arm} of experiment {o.experiment}"
            + (" (PROVISIONAL)" if baseline.provisional else ""),
            f"# verdict {o.verdict}; written by lmlab adopt {o.adopted_at}.",
            "# A spec starts from it with  controlled: {extends: THIS_FILE, ...overrides}",
            "# (the path relative to the spec). Edit a copy rather than this file: specs that",
            "# extended it recorded its digest."]
    body = yaml.safe_dump(baseline.model_dump(mode="json"), sort_keys=False,
                          allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None


def _same_decision(path: Path, baseline: BaselineFile) -> bool:
    """Whether ``path`` is a baseline of this same decision (only when it was adopted, and
    what the report said around it, may differ)."""
    old = _read(path)
    if not isinstance(old, dict):
        return False
    new = baseline.model_dump(mode="json")
    return all(old.get(k) == new[k] for k in ("provisional", "adopted", "controlled")) and \
        all((old.get("origin") or {}).get(k) == new["origin"][k]
            for k in ("experiment", "directory", "arm", "verdict"))
