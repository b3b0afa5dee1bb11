"""The researcher's notes, at the end of section 10: those the spec wrote (``notes``), then
those added with ``lmlab note DIR "text"``, each with the UTC time it was stored."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.report.inputs import ReportInputs


@dataclass(frozen=True)
class Note:
    when: str  # "spec" or the UTC time it was stored
    text: str


def section(inputs: ReportInputs) -> list[Note]:
    spec = inputs.spec
    written = [Note("spec", t) for t in (spec.note_list if spec else []) if t.strip()]
    added = [Note(f"{str(n.get('at', ''))[:19].replace('T', ' ')} UTC", str(n["text"]))
             for n in inputs.exp.notes]
    return written + added
