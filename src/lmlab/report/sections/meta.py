"""Section 0, Experiment Meta: name, category, date, commit and seeds, all captured from the runs'
provenance and the stored spec, never typed by hand."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmlab.report.format import NA, Item
from lmlab.report.inputs import ReportInputs

CATEGORY_NAMES = {"hyperparam": "Hyperparam", "optimizer": "Optimizer", "memory": "Memory",
                  "architecture": "Architecture", "recipe": "Training Recipe"}
NOT_STARTED = "not captured (no run has started)"


@dataclass(frozen=True)
class SpecText:
    path: str
    hash: str
    text: str


@dataclass(frozen=True)
class Meta:
    items: list[Item]
    warnings: list[str]
    versions: str | None  # torch / lmlab / python, as the runs recorded them
    spec: SpecText | None  # the spec as written


def section(inputs: ReportInputs) -> Meta:
    exp, spec = inputs.exp, inputs.spec
    provs = inputs.provenances
    warnings: list[str] = []
    commit = _commit(inputs, warnings)
    seeds_run = sorted({r.seed for r in exp.runs})
    seeds_spec = spec.meta.seeds if spec else seeds_run
    seeds = ", ".join(map(str, seeds_spec)) or NA
    added = sorted(set(seeds_run) - set(seeds_spec))
    if exp.sequential and added:
        seeds += (f" declared; {', '.join(map(str, added))} added until settled "
                  f"({len(exp.sequential.get('looks', []))} looks, see section 9)")
    elif spec and set(seeds_run) != set(seeds_spec) and seeds_run:
        seeds += f" (runs in the store: {', '.join(map(str, seeds_run))})"
    versions = Counter((p.get("torch_version"), p.get("lmlab_version"), p.get("python_version"))
                       for p in provs)
    listed = "; ".join(f"torch {t}, lmlab {lm}, python {py}" for t, lm, py in versions)
    if len(versions) > 1:
        warnings.append(f"runs used different torch / lmlab / python versions: {listed}")
    category = (CATEGORY_NAMES.get(spec.meta.category, spec.meta.category) if spec
                else "not recorded (no spec stored)")
    items = [Item("Experiment Name", exp.name), Item("Category", category),
             Item("Date", _date(inputs)), Item("Commit Hash / Branch", commit),
             Item("Seed(s)", seeds)]
    if (text := baseline_origin(inputs)) is not None:
        items.append(Item("Baseline", text))
    return Meta(
        items=items,
        warnings=warnings, versions=listed if versions else None, spec=_spec_text(inputs))


def _date(inputs: ReportInputs) -> str:
    captured = sorted(p["captured_at"] for p in inputs.provenances if p.get("captured_at"))
    if not captured:
        return NOT_STARTED
    first, last = captured[0], captured[-1]
    if first[:16] == last[:16]:
        return f"{first[:10]} (runs started {first[11:16]} UTC)"
    if first[:10] == last[:10]:
        return f"{first[:10]} (runs started {first[11:16]}–{last[11:16]} UTC)"
    return f"{first[:10]} to {last[:10]}"


def _commit(inputs: ReportInputs, warnings: list[str]) -> str:
    commits = Counter((p.get("git_commit"), p.get("git_branch")) for p in inputs.provenances)
    if not commits:
        return NOT_STARTED
    parts = []
    for (sha, branch), n in commits.items():
        text = (sha[:12] if sha else "not a git checkout") + (
            f" / {branch}" if branch else " / (detached HEAD)" if sha else "")
        parts.append(text + (f" ({n} runs)" if len(commits) > 1 else ""))
    commit = "; ".join(parts)
    if len(commits) > 1:
        warnings.append(f"runs were made from {len(commits)} different commits")
    runs = inputs.exp.runs
    dirty = [r.run_id for r in runs if r.provenance.get("git_dirty")]
    if dirty:
        commit += " — DIRTY: uncommitted changes to tracked files"
        warnings.append(f"{len(dirty)} of {len(runs)} runs ran with uncommitted changes: the "
                        "commit alone does not reproduce them")
    return commit


def _spec_text(inputs: ReportInputs) -> SpecText | None:
    rec = inputs.exp.spec_record
    if not rec or not rec.get("text"):
        return None
    return SpecText(str(rec.get("path") or "?"), str(rec.get("hash") or "?"), str(rec["text"]))


def baseline_origin(inputs: ReportInputs) -> str | None:
    """The baseline the spec extended and where it came from, as the stored spec recorded it
    when the experiment was opened (the file may have changed since; its digest says which)."""
    b = (inputs.exp.spec_record or {}).get("baseline")
    if not b:
        return None
    o = b.get("origin") or {}
    commit = o.get("git_commit")
    parts = [f"extends {b.get('path')} (digest {b.get('digest')})",
             f"adopted from experiment {o.get('experiment', '?')} ({o.get('directory', '?')}), "
             f"arm {o.get('arm', '?')}" + (" chosen with --arm" if o.get("selected_by") == "--arm"
                                           else ", its report's decision"),
             f"verdict {o.get('verdict', '?')}"
             + (" — PROVISIONAL: adopted before the decision was settled"
                if b.get("provisional") else ""),
             f"lmlab {o.get('lmlab_version') or '?'}, commit "
             f"{commit[:12] if commit else 'not recorded'}"
             + (f" / {o['git_branch']}" if o.get("git_branch") else ""),
             f"adopted {str(o.get('adopted_at', '?'))[:10]}"]
    if o.get("report"):
        parts.append(f"report {o['report']}")
    return "; ".join(parts)
