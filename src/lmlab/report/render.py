"""Write an experiment's report: the team's template filled in from the store.

``write_report(DIR)`` reads ``DIR/lmlab.sqlite`` and writes

* ``DIR/report.md``: GitHub-flavoured Markdown, figures linked from ``DIR/report_files/``;
* ``DIR/report.html``: one self-contained file (figures embedded as base64 data URIs, inline
  CSS, no scripts, nothing fetched), so it can be mailed or opened offline;
* ``DIR/summary.csv``: one row per arm, full precision.

It only reads the store: no training, no network. Both documents render the same content
(:mod:`lmlab.report.content`); the templates decide layout only. Text that comes from the spec
is escaped for each format: HTML by Jinja2's autoescaping, Markdown by the filters below (a
``<script>`` in a spec must not become live markup in either).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from lmlab.analysis.summary import load_experiment, summarize_arms, write_summary_csv
from lmlab.analysis.verdict import judge_experiment
from lmlab.report.content import ReportContent, Table, memory_label
from lmlab.report.plots import Figure, make_figures

TEMPLATES = Path(__file__).parent / "templates"
FILES_DIR = "report_files"


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    csv: Path
    figures: list[Path]


def write_report(out_dir: Path | str) -> ReportPaths:
    """Build the report of the experiment in ``out_dir``; raises UserError if it has no store."""
    out_dir = Path(out_dir)
    exp = load_experiment(out_dir)
    arms = summarize_arms(exp)
    verdict = judge_experiment(exp, arms)
    files = out_dir / FILES_DIR
    # Figures of an earlier report that this one no longer draws would otherwise linger and
    # look current; only our own PNGs are removed.
    if files.is_dir():
        for old in files.glob("*.png"):
            old.unlink()
    figures = make_figures(exp, arms, files, memory_label(exp))
    ctx = ReportContent(exp, arms, verdict, figures).context()
    md_path = _write(out_dir / "report.md", render_markdown(ctx, out_dir))
    html_path = _write(out_dir / "report.html", render_html(ctx))
    csv_path = write_summary_csv(arms, out_dir / "summary.csv")
    return ReportPaths(md_path, html_path, csv_path, [f.path for f in figures.values()])


def render_markdown(ctx: dict, out_dir: Path) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(md=md_text, inline=md_inline, cell=md_cell, table=md_table,
                       code_block=md_code_block)
    env.filters["rel"] = lambda fig: fig.path.relative_to(out_dir).as_posix()
    text = env.get_template("report.md.j2").render(**ctx)
    # Optional sections leave runs of blank lines behind; Markdown needs at most one.
    return re.sub(r"\n{3,}", "\n\n", text)


def render_html(ctx: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["data_uri"] = data_uri
    return env.get_template("report.html.j2").render(**ctx)


def data_uri(fig: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(fig.path.read_bytes()).decode("ascii")


def _write(path: Path, text: str) -> Path:
    # Write then rename: a reader (a browser refreshing, a CI artifact upload) never sees half
    # a report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- Markdown escaping ---------------------------------------------------------------------------

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
