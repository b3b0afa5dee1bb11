"""Markdown escaping: text that comes from a spec (or a run's error) must not become live
markup or an accidental heading in a Markdown report, and a table cell must stay one cell."""

from __future__ import annotations

import re

from lmlab.report.format import Table

# "<" followed by a letter, "/", "!" or "?" starts raw HTML in CommonMark; "a < b" does not.
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
_HEADING_START = re.compile(r"^(\s{0,3})(#)", re.MULTILINE)
_SETEXT = re.compile(r"^(\s{0,3})([=-]+\s*)$", re.MULTILINE)


def md_text(value: object) -> str:
    """Spec text as a Markdown paragraph: no raw HTML, no accidental headings."""
    text = _TAG_START.sub("&lt;", str(value))
    text = _HEADING_START.sub(r"\1\\\2", text)
    return _SETEXT.sub(r"\1\\\2", text)


def md_inline(value: object) -> str:
    """Text inside a list item or after a label: one line (a blank line would end the item)."""
    text = md_text(str(value).strip())
    text = re.sub(r"\n\s*\n", "<br><br>", text)
    return re.sub(r"\s*\n\s*", " ", text)


def md_cell(value: object) -> str:
    return md_inline(value).replace("|", "\\|")


def md_table(table: Table) -> str:
    sep = ["---:" if a == "r" else "---" for a in table.align]
    lines = ["| " + " | ".join(md_cell(h) for h in table.headers) + " |",
             "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def md_code_block(text: object, lang: str = "") -> str:
    """A fenced block that no backtick run inside ``text`` can close early."""
    body = str(text).rstrip("\n")
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{body}\n{fence}"
