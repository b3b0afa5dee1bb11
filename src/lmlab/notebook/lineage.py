"""``lmlab notebook DIR``: every experiment under DIR in time order, with its question, verdict,
decision, Phase-1 answer and lineage (the baseline it extended, and the experiments that
extended a baseline adopted from it), written to ``DIR/notebook.md`` and ``DIR/notebook.html``.

Each experiment's judgements are its report's (:mod:`lmlab.report.sections`), read from its
store read-only (a running sweep is neither blocked nor changed); lineage comes from what each
stored spec recorded of its baseline (path, digest, origin), so it holds after a baseline file is
edited, moved or deleted.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lmlab.analysis.summary import load_experiment
from lmlab.errors import UserError
from lmlab.names import RESULT_ADOPTED_PREFIX, STORE_FILE
from lmlab.report.format import Table
from lmlab.report.inputs import gather
from lmlab.report.markdown import md_cell, md_inline
from lmlab.report.sections import decision, followups
from lmlab.store import Store

MAX_DEPTH = 4  # DIR/exp, DIR/project/exp, ... as lmlab serve looks
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Entry:
    """One experiment of the notebook."""

    name: str
    directory: Path
    started: str  # the first run's start (UTC), or "" when none has started
    question: str
    verdict: str
    decision: str
    phase1: str
    report: Path | None
    baseline: dict[str, Any] | None  # the stored spec's record of its baseline
    adopt: str  # the decision in a word: the arm, "(provisional)" when it is
    ready: bool  # moves to Phase-1
    extends: str = ""  # "experiment (arm, baseline path)" it descends from
    extended_by: list[str] = field(default_factory=list)


def experiment_dirs(root: Path) -> list[Path]:
    """Every directory at most ``MAX_DEPTH`` below ``root`` (itself included) with a store."""
    found = []
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if STORE_FILE in files:
            found.append(Path(here))
        dirs[:] = [d for d in sorted(dirs) if depth < MAX_DEPTH and not d.startswith(".")]
    return found


def _entry(directory: Path) -> Entry:
    with Store(directory / STORE_FILE, read_only=True) as store:
        exp = load_experiment(directory, store=store)
        adopted = [store.get_result(k) for k in store.result_keys(RESULT_ADOPTED_PREFIX)]
    inputs = gather(exp)
    spec = exp.spec
    started = sorted(str(r.provenance["captured_at"]) for r in exp.runs
                     if r.provenance.get("captured_at"))
    d = decision.section(inputs)
    best = inputs.findings.best
    choice = (f"{best}" + (" (provisional)" if d.provisional else "")) if best else "none yet"
    chosen = [f"{it.label.removeprefix('Selected ')}: {it.value}" for it in d.items
              if not it.value.startswith("n/a")]
    report = directory / "report.md"
    return Entry(
        name=exp.name, directory=directory.resolve(), started=started[0] if started else "",
        question=spec.objective.strip() if spec else "(no spec stored)",
        verdict=inputs.verdict.overall if spec else "n/a",
        decision="; ".join([f"adopt {choice}", *chosen, *(
            f"adopted: arm {a['arm']} as {a['path']}" + (" (provisional)" if a["provisional"]
                                                         else "")
            for a in adopted if isinstance(a, dict))]),
        phase1=" ".join(followups.section(inputs)[2].answers),
        report=report if report.is_file() else None,
        baseline=(exp.spec_record or {}).get("baseline"), adopt=choice,
        ready=inputs.findings.phase1.ready)


def entries(root: Path | str) -> list[Entry]:
    """The notebook's rows, oldest first (by first run start; unstarted ones last)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("not a directory", file=str(root))
    found = [_entry(d) for d in experiment_dirs(root)]
    if not found:
        raise UserError(f"no experiments under it (no {STORE_FILE} within {MAX_DEPTH} levels)",
                        file=str(root))
    found.sort(key=lambda e: (e.started == "", e.started, e.name))
    names = Counter(e.name for e in found)
    for e in found:  # two runs of one spec: the directory tells them apart
        if names[e.name] > 1:
            e.name = f"{e.name} ({os.path.relpath(e.directory, root.resolve())})"
    by_dir = {e.directory: e for e in found}
    for e in found:
        if not e.baseline:
            continue
        origin = e.baseline.get("origin") or {}
        parent = by_dir.get(Path(str(origin.get("directory", ""))))
        e.extends = (f"{origin.get('experiment', '?')} (arm {origin.get('arm', '?')}"
                     + (", provisional" if e.baseline.get("provisional") else "")
                     + f"; {e.baseline.get('path')}, digest {e.baseline.get('digest')})")
        if parent is not None:
            parent.extended_by.append(e.name)
    return found


def table(found: list[Entry]) -> Table:
    rows = [[str(i + 1), e.name, e.started[:16].replace("T", " ") or "not started",
             e.question, e.verdict, e.decision, e.phase1, e.extends or "—",
             ", ".join(e.extended_by) or "—"] for i, e in enumerate(found)]
    return Table(["#", "experiment", "started (UTC)", "question", "verdict", "decision",
                  "Phase-1", "extends", "extended by"], rows)


def short_table(found: list[Entry]) -> Table:
    """The terminal's version: a word per judgement (the files have the sentences)."""
    rows = [[str(i + 1), e.name, e.started[:16].replace("T", " ") or "not started", e.question,
             e.verdict, e.adopt, "moves" if e.ready else "refine",
             e.extends.split(";")[0] + ")" if e.extends else "—",
             ", ".join(e.extended_by) or "—"] for i, e in enumerate(found)]
    return Table(["#", "experiment", "started (UTC)", "question", "verdict", "adopt",
                  "Phase-1", "extends", "extended by"], rows)


def write_notebook(root: Path | str) -> tuple[Path, Path, list[Entry]]:
    root = Path(root)
    found = entries(root)
    ctx = {"root": str(root.resolve()), "entries": found, "table": table(found),
           "rel": lambda p: os.path.relpath(p, root)}
    md = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                            trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                            undefined=jinja2.StrictUndefined)
    md.filters.update(inline=md_inline, cell=md_cell)
    html = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)
    md_path, html_path = root / "notebook.md", root / "notebook.html"
    for path, env, name in ((md_path, md, "notebook.md.j2"), (html_path, html,
                                                                 "notebook.html.j2")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(env.get_template(name).render(**ctx))
        tmp.replace(path)
    return md_path, html_path, found
