"""The ``lmlab`` command line (typer + rich).

Every error a user can cause ends as one line ``file:line field: message`` on stderr and exit
code 2; bugs keep their traceback. This module holds the app and what every command shares (the
data options, the plan a spec loads to, warnings); the commands are in ``experiment.py`` (train,
new, validate, plan, preflight, run), ``results.py`` (status, report, compare, systems, export,
doctor, serve) and ``notebook.py`` (adopt, note, notebook).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from lmlab import __version__
from lmlab.errors import UserError


def _untyped_flags(params: list) -> list:
    """typer's rich help prints a type tag beside every option, flags included (``--json
    <bool>``, even ``--help <bool>``); a flag takes no value, so it gets no tag."""
    for p in params:
        if isinstance(p, TyperOption) and (p.is_flag or p.count) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _App(typer.Typer):
    """Every command help-formatted by :class:`_Command`, however it is declared."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Controlled language-model training experiments on WikiText-2.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        import platform

        import torch

        out.print(f"lmlab {__version__} (torch {torch.__version__}, python "
                  f"{platform.python_version()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print lmlab's version (and torch's and python's) and exit")] = False) -> None:
    # The group's own options; the help text is the app's.
    pass


# -- where the data comes from: the same options, and environment variables, for every command
# that loads data (run, plan, preflight, train) --------------------------------------------------

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="LMLAB_DATA_DIR", file_okay=False,
    help="a folder holding wikitext-2-raw-v1/ (wiki.{train,valid,test}.raw) and, for the gpt2 "
         "tokenizer, gpt2-tokenizer/; searched before the cache (~/.cache/lmlab) and the "
         "download")]
FallbackCorpus = Annotated[Path | None, typer.Option(
    "--fallback-corpus", envvar="LMLAB_FALLBACK_CORPUS", exists=True, file_okay=False,
    help="if WikiText-2 can be neither found nor downloaded, train on this local corpus "
         "folder (train.txt, valid.txt, test.txt) instead, recorded and reported under its own "
         "name")]


def use_data_dir(data_dir: Path | None) -> None:
    """Worker processes inherit the environment: setting it here reaches every run."""
    if data_dir is not None:
        import os

        os.environ["LMLAB_DATA_DIR"] = str(data_dir.expanduser().resolve())


def fmt_cell(value: object, digits: int = 4) -> str:
    """A number as the report writes it (lmlab.report.format); anything else as it is."""
    from lmlab.report.format import sig

    return sig(value, digits) if value is None or isinstance(value, float) else str(value)


PACK_HELP = ("auto | off | N: train runs of one shape (seeds, arms that only change numbers) "
             "together as one stacked model, each with its own record (default: the spec's "
             "execution.pack, off)")


def plan_of(spec: Path, data_dir: Path | None = None, fallback: Path | None = None):
    """The spec's plan, its data found as ``--data-dir`` / ``--fallback-corpus`` (or their
    environment variables) say: the same for every command that loads data."""
    from lmlab.spec.expand import load_plan

    use_data_dir(data_dir)
    p = load_plan(spec)
    if fallback is None:
        return p
    with p.doc.located("controlled"):
        swapped = fallback_data(p.spec.controlled.data, p.base, fallback)
    return p.on_data(swapped)


def warn(p, *, bound: bool = True) -> None:
    """Print the settings of plan ``p`` that cannot do what they say (and, with ``bound``,
    a budget this machine cannot finish in a day), each as ``file:line field: ...``."""
    from lmlab.execute.feasible import too_long
    from lmlab.spec.advice import advise

    items = advise(p)
    if bound and (slow := too_long(p)) is not None:
        items.append(slow)
    for a in items:
        console.print(f"warning: {p.doc.error(a.field, a.message)}", style="yellow",
                      markup=False, highlight=False)


def show_baseline(p) -> None:
    """The baseline plan ``p``'s spec extends, what it inherited and what it overrode."""
    from lmlab.spec.baseline import summary_lines

    if p.doc.extends is None:
        return
    for line in summary_lines(p.doc.extends):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if p.doc.extends.baseline.provisional:
        o = p.doc.extends.baseline.origin
        console.print(f"warning: {p.doc.error('controlled.extends', 'the baseline is provisional')}"
                      f" (verdict {o.verdict} in {o.experiment}): this experiment builds on a "
                      "decision that was not settled", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)


def fallback_data(data, base: Path, corpus: Path):
    """``data``, or the fallback corpus's config when ``data``'s WikiText-2 is not here (said
    on stderr: every record and the report name the corpus used)."""
    from lmlab.data.wikitext import with_fallback

    swapped, why = with_fallback(data, base, corpus)
    if why is not None:
        console.print(f"[yellow]WikiText-2 is not available here[/] ({why.splitlines()[0][:160]})"
                      f"\n[yellow]training on the local corpus {corpus} instead; every record "
                      "and the report name it as what it is, not WikiText-2[/]", soft_wrap=True)
    return swapped


# The commands register themselves on ``app`` when imported.
from lmlab.cli import experiment, notebook, results  # noqa: E402, F401


def main() -> None:
    """Console entry point: user errors exit 2 with one line, never a traceback. Usage errors
    (unknown option, missing argument) are click's, which also exit 2."""
    try:
        app()
    except UserError as e:
        for line in e.lines():
            console.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)

