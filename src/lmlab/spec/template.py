"""``lmlab new``: the experiment template as a commented spec file.

The text lives in ``template.yaml``; the lists it names (the metrics a check can use, the
operators) are filled in from the schema here, so the template cannot drift from what
``lmlab validate`` accepts (``tests/test_spec.py`` validates what this writes).
"""

from __future__ import annotations

import textwrap
import typing
from importlib.resources import files

from lmlab.names import RUN_METRICS
from lmlab.spec.schema import Check


def render(name: str, category: str) -> str:
    text = files("lmlab.spec").joinpath("template.yaml").read_text()
    metrics = textwrap.fill(", ".join(RUN_METRICS) + ".", width=96, initial_indent="  # ",
                            subsequent_indent="  # ")
    ops = " ".join(typing.get_args(Check.model_fields["op"].annotation))
    return (text.replace("__NAME__", name).replace("__CATEGORY__", category)
            .replace("__METRICS__", metrics).replace("__OPS__", ops))
