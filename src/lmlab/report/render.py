"""Write an experiment's report: the team's template filled in from the store.

``write_report(DIR)`` reads ``DIR/lmlab.sqlite`` and writes

* ``DIR/report.md``: GitHub-flavoured Markdown, figures linked from ``DIR/report_files/``;
* ``DIR/report.html``: one self-contained file (figures embedded as base64 data URIs, inline
  CSS, no scripts, nothing fetched), so it can be mailed or opened offline;
* ``DIR/summary.csv``: one row per arm, full precision.

It only reads the store: no training, no network. Both documents render the same content
(:mod:`lmlab.report.sections`); the templates decide layout only. Text that comes from the spec
is escaped for each format: HTML by Jinja2's autoescaping, Markdown by the filters of
:mod:`lmlab.report.markdown` (a ``<script>`` in a spec must not become live markup in either).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from lmlab.analysis.summary import load_experiment, write_summary_csv
from lmlab.report.inputs import gather
from lmlab.report.markdown import md_cell, md_code_block, md_inline, md_table, md_text
from lmlab.report.plots import Figure, make_figures
from lmlab.report.sections import context

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
    inputs = gather(load_experiment(out_dir))
    files = out_dir / FILES_DIR
    # Figures of an earlier report that this one no longer draws would otherwise linger and
    # look current; only our own PNGs are removed.
    if files.is_dir():
        for old in files.glob("*.png"):
            old.unlink()
    figures = make_figures(inputs.exp, inputs.arms, files, inputs.memory_label)
    ctx = context(dataclasses.replace(inputs, figures=figures))
    md_path = _write(out_dir / "report.md", render_markdown(ctx, out_dir))
    html_path = _write(out_dir / "report.html", render_html(ctx))
    csv_path = write_summary_csv(inputs.arms, out_dir / "summary.csv")
    return ReportPaths(md_path, html_path, csv_path, [f.path for f in figures.values()])


def render_markdown(ctx: dict[str, Any], out_dir: Path) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(md=md_text, inline=md_inline, cell=md_cell, table=md_table,
                       code_block=md_code_block)
    env.filters["rel"] = lambda fig: fig.path.relative_to(out_dir).as_posix()
    text = env.get_template("report.md.j2").render(**ctx)
    # Optional sections leave runs of blank lines behind; Markdown needs at most one.
    return re.sub(r"\n{3,}", "\n\n", text)


def render_html(ctx: dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["data_uri"] = data_uri
    env.filters["cell"] = html_cell
    return env.get_template("report.html.j2").render(**ctx)


_SEEDS = re.compile(r"^(.*\S) (\(n=\d+\))$")


def html_cell(text: str) -> markupsafe.Markup:
    """A table cell, escaped. A seed summary "mean ± std (n=k)" becomes two unbreakable parts,
    the number and its "(n=k)", so a narrow column wraps between them and never inside a number."""
    m = _SEEDS.match(str(text))
    if m is None:
        return markupsafe.escape(text)
    return markupsafe.Markup('<span class="v">{}</span> <span class="n">{}</span>').format(
        m.group(1), m.group(2))


def data_uri(fig: Figure) -> str:
    return "data:image/png;base64," + base64.b64encode(fig.path.read_bytes()).decode("ascii")


def _write(path: Path, text: str) -> Path:
    # Write then rename: a reader (a browser refreshing, a CI artifact upload) never sees half
    # a report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
