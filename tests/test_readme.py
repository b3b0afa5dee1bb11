"""The README's commands as a new user types them: it opens with the two set-up commands, every
`lmlab` line names a real command with real options, the ones that need no data run as written
against an experiment directory, the `lmlab train` config it shows is valid, and its quickstart
claim is the spec's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lmlab.cli import app
from lmlab.config import RunConfig
from lmlab.identity import run_id
from lmlab.spec.load import YamlDoc, upgrade_run_doc, validate
from test_report import CLEAR_WIN, build_experiment

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.DOTALL)


def commands(block: str) -> list[str]:
    """The command lines of a shell block, comments dropped."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


LMLAB_LINES = [line for kind, block in BLOCKS if kind == "bash" for line in commands(block)
               if line.startswith("lmlab ")]


def test_the_readme_opens_with_the_two_setup_commands() -> None:
    kind, first = BLOCKS[0]
    assert README.startswith("```bash\n") and kind == "bash"
    assert commands(first) == ["make quickstart", "make test"]
    targets = re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert {"quickstart", "test"} <= set(targets)
    # and says how to reach the CLI they install
    assert "source .venv/bin/activate" in README and ".venv/bin/lmlab" in README


@pytest.mark.parametrize("line", LMLAB_LINES)
def test_every_lmlab_line_is_a_real_command(line: str) -> None:
    """Parsed as click parses it: the command, its options and its number of arguments."""
    group = typer.main.get_command(app)
    args = shlex.split(line)[1:]
    if args == ["--version"]:  # eager: prints and exits while parsing
        with pytest.raises(typer.Exit):
            group.make_context("lmlab", list(args))
        return
    ctx = group.make_context("lmlab", list(args))
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    name, command, rest = group.resolve_command(ctx, rest)
    assert command is not None, line
    command.make_context(name, rest, parent=ctx)


def test_the_commands_that_need_no_data_run_as_written(tmp_path: Path, monkeypatch) -> None:
    """The first walkthrough block, line by line (in this process: the CLI's own parsing and
    code, without a fresh interpreter per line), in a directory with a finished runs/quickstart
    (a synthetic one: the real one takes minutes)."""
    build_experiment(tmp_path / "runs" / "quickstart", CLEAR_WIN, name="quickstart")
    monkeypatch.chdir(tmp_path)
    block = next(b for kind, b in BLOCKS if kind == "bash" and "lmlab status runs/quickstart" in b)
    ran = 0
    for line in commands(block):
        if line.startswith("source "):
            continue
        args = shlex.split(line)
        assert args[0] == "lmlab", line
        done = CliRunner().invoke(app, args[1:], prog_name="lmlab", terminal_width=100)
        assert done.exit_code == 0, (line, done.output[-2000:], done.exception)
        ran += 1
    assert ran >= 8
    assert (tmp_path / "warmup-study.yaml").is_file()
    assert (tmp_path / "runs" / "quickstart" / "report.html").is_file()
    assert any((tmp_path / "runs" / "quickstart" / "tensorboard").rglob("events.out.*"))


def test_the_train_config_shown_is_valid() -> None:
    section = README[README.index("## `lmlab train`"):]
    text = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    name = re.search(r"^# (\S+)\.yaml", text).group(1)
    doc = upgrade_run_doc(YamlDoc(path=Path(f"{name}.yaml"), data=yaml.safe_load(text),
                                  lines={}))
    cfg = validate(doc, RunConfig)
    assert set(yaml.safe_load(text)) == set(RunConfig.model_fields)  # every section shown
    assert f"run `{run_id(name, cfg.train.seed)}`" in section and f"`runs/{name}/`" in section


def test_the_quickstart_claim_is_the_specs() -> None:
    spec = (ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8")
    claim = re.compile(r"about (\d+) minutes? on (\d+) (?:busy |quiet )?CPU cores")
    said = claim.search(" ".join(spec.split()))
    assert said, "the quickstart spec states its measured time"
    assert said.groups() == claim.search(" ".join(README.split())).groups()
