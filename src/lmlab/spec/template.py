"""``lmlab new``: the experiment template as a commented spec file, asking a question of its
category's kind.

The text lives in ``template.yaml``; what differs by category (the example question, arms of
that kind, checks, an expected outcome, the addendum line) in ``categories.yaml``. The lists the
template names (the metrics a check can use, the operators, the categories) are filled in from
the schema here, so the template cannot drift from what ``lmlab validate`` accepts
(``tests/test_spec.py`` validates what this writes for every category).
"""

from __future__ import annotations

import textwrap
import typing
from importlib.resources import files

import yaml

from lmlab.names import RUN_METRICS
from lmlab.spec.schema import Category, Check, Meta

CATEGORIES: tuple[str, ...] = typing.get_args(Category)
# An experiment name as meta.name accepts it (it names files and directories).
NAME_PATTERN: str = next(m.pattern for m in Meta.model_fields["name"].metadata
                         if getattr(m, "pattern", None))


def render(name: str, category: str) -> str:
    text = files("lmlab.spec").joinpath("template.yaml").read_text()
    kinds = yaml.safe_load(files("lmlab.spec").joinpath("categories.yaml").read_text())
    kind = kinds[category]
    metrics = textwrap.fill(", ".join(RUN_METRICS) + ".", width=96, initial_indent="  # ",
                            subsequent_indent="  # ")
    ops = " ".join(typing.get_args(Check.model_fields["op"].annotation))
    slots = {
        "__NAME__": name, "__CATEGORY__": category, "__METRICS__": metrics, "__OPS__": ops,
        "__EXAMPLE__": _comment(f"Example ({category}): {kind['example']}"),
        "__CHECKS__": textwrap.indent(kind["checks"].rstrip("\n"), "    "),
        "__INDEPENDENT__": textwrap.indent(kind["independent"].rstrip("\n"), "  "),
        "__EXPECTED__": _comment(kind["expected"]),
        "__ADDENDUM__": kind["addendum"],
    }
    for slot, value in slots.items():
        text = text.replace(slot, value)
    return text


def _comment(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent="# ", subsequent_indent="#   ")
