"""The command line as a new user meets it: --version, help texts, the status table on an
80-column terminal, `lmlab new` errors, and one data lookup (LMLAB_DATA_DIR / --data-dir,
LMLAB_FALLBACK_CORPUS / --fallback-corpus) for every command that loads data."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import lmlab
from hubserver import HubServer
from lmlab.cli import app
from lmlab.report.terminal import STATUS_COLUMNS
from lmlab.store import Store
from test_report import CLEAR_WIN, Arm, build_experiment
from test_spec import base_spec

COMMAND = typer.main.get_command(app)


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess[str]:
    # The fallback corpus is the test's to give: `make test` exports one for the whole suite.
    inherited = {k: v for k, v in os.environ.items() if k != "LMLAB_FALLBACK_CORPUS"}
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True,
                          text=True, env={**inherited, **(env or {})}, cwd=cwd, timeout=timeout)


def help_of(*args: str, width: int = 200) -> str:
    done = CliRunner().invoke(app, [*args, "--help"], prog_name="lmlab", terminal_width=width,
                              env={"COLUMNS": str(width)})
    assert done.exit_code == 0, done.output
    return done.output


# ---- version and help --------------------------------------------------------------------------

def test_version_is_the_package_version() -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"lmlab {lmlab.__version__} (torch ")
    assert importlib.metadata.version("lmlab") == lmlab.__version__  # one definition


def test_help_tags_no_flag_with_a_type_and_describes_every_option() -> None:
    assert "<bool>" not in help_of()
    for name, command in COMMAND.commands.items():
        text = help_of(name)
        assert "<bool>" not in text, name
        for param in command.params:
            if isinstance(param, typer.core.TyperOption):
                assert param.help, f"lmlab {name} {param.opts[0]} has no description"
    assert "--skip-preflight" in help_of("run") and "without the Overfit Sanity" in help_of("run")


def test_every_command_summary_is_one_line_in_the_command_list() -> None:
    """typer keeps the first paragraph's line breaks in the command list: a docstring whose
    summary runs over several source lines was shown broken mid-sentence ("systems")."""
    for name, command in COMMAND.commands.items():
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert "\n" not in first, (name, first)
    listing = help_of(width=160)
    assert "The Memory / Systems addendum of an experiment, in the terminal." in listing


def test_train_help_names_the_sections_a_config_file_has() -> None:
    text = " ".join(help_of("train").split())
    for section in ("data", "tokenizer", "model", "optimizer", "schedule", "train", "budget",
                    "evaluation", "cadence"):
        assert section in text
    assert "eval," not in text and "--fallback-corpus" in text and "--data-dir" in text


# ---- status ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("status")
    arms = [*CLEAR_WIN, Arm("batch_size=16_lr=0.001", {"optimizer.lr": 1e-3}, [5.0, 5.1, 5.2],
                            diverge_at={1: 34}, spikes={0: [25]})]
    return build_experiment(d, arms)


@pytest.mark.parametrize("width", [80, 100, 200])
def test_status_never_cuts_a_cell(experiment: Path, width: int) -> None:
    done = cli("status", str(experiment), env={"COLUMNS": str(width)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= width for line in lines), max(map(len, lines))
    assert "…" not in done.stdout
    # A long run id may fold onto more lines of its column, but no character is lost: glue
    # the run column's pieces back together.
    header = next(line for line in lines if line.startswith("run "))
    body = lines[lines.index(header) + 2:]
    column = "".join(line[:header.index("status")].strip() for line in body)
    for rid in ("lr1e-3-s0", "lr3e-3-s2", "batch_size=16_lr=0.001-s0",
                "batch_size=16_lr=0.001-s1"):
        assert rid in column, (rid, column)
    words = done.stdout.split()
    for cell in ("completed", "diverged", "spike:1", "divergence:1", "21,000", "310.0"):
        assert cell in words, cell
    assert "MiB" in done.stdout and " MB" not in done.stdout
    if width >= 140:
        assert all(h.split()[-1] in done.stdout for h, _, _ in STATUS_COLUMNS)
        assert "too narrow" not in done.stderr
    else:
        assert "too narrow for" in done.stderr and "--json" in done.stderr


# ---- new -----------------------------------------------------------------------------------------

def test_new_blames_the_name_or_the_category_it_got_wrong(tmp_path: Path) -> None:
    bad_name = cli("new", "bad name", cwd=tmp_path)
    assert bad_name.returncode == 2 and "Traceback" not in bad_name.stderr
    assert bad_name.stderr.startswith("error: NAME: 'bad name' cannot name an experiment")
    assert "--category" not in bad_name.stderr
    bad_category = cli("new", "ok-name", "--category", "vibes", cwd=tmp_path)
    assert bad_category.returncode == 2
    assert bad_category.stderr.startswith("error: --category: unknown category 'vibes'")
    assert not list(tmp_path.iterdir())  # nothing written for either


# ---- errors and warnings through the CLI --------------------------------------------------------

def test_validate_shows_every_error_with_its_line(tmp_path: Path, articles_data: dict) -> None:
    spec = base_spec(articles_data)
    spec["hypotesis"] = spec.pop("hypothesis")  # a top-level typo
    spec["controlled"]["model"]["n_layer"] = "two"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = cli("validate", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith(f"error: {path}:") for line in lines), lines
    text = "\n".join(lines)
    assert "hypotesis: unknown field (did you mean 'hypothesis'?)" in text
    assert "hypothesis: required field is missing" in text
    assert "controlled.model.n_layer: input should be a valid integer" in text
    assert "more error" not in text


def test_validate_warns_on_settings_that_cannot_do_what_they_say(tmp_path: Path,
                                                                  articles_data: dict) -> None:
    spec = base_spec(articles_data)
    spec["evaluation"] = {"every_tokens": 10 * spec["budget"]["tokens"], "max_batches": 4}
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = cli("validate", str(path))
    assert done.returncode == 0, done.stderr  # a warning, not a failure
    line = next(x for x in done.stderr.splitlines() if "every_tokens" in x)
    assert line.startswith(f"warning: {path}:") and "evaluation.every_tokens" in line
    assert "val-loss curve has two points" in line


# ---- data lookup: the same for every command that loads data --------------------------------------

@pytest.fixture
def offline(tmp_path: Path, data_dir: Path) -> Iterator[dict[str, str]]:
    """An environment where WikiText-2 is neither on disk nor downloadable: an empty
    LMLAB_DATA_DIR and a stand-in hub that has no files."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    with HubServer() as hub:
        yield {"LMLAB_DATA_DIR": str(empty), "HF_ENDPOINT": hub.url,
               "ARTICLES": str(data_dir / "wikitext-2-test-articles")}


def _wikitext_spec(tmp_path: Path, articles_data: dict) -> Path:
    spec = base_spec(articles_data)
    spec["controlled"]["data"] = {"dataset": "wikitext-2-raw-v1"}
    spec["meta"]["seeds"] = [0]
    spec["preflight"].update(lr=1e-2, steps=80)  # memorising 2 windows quickly needs a high lr
    path = tmp_path / "wt2.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_without_data_every_data_command_says_where_it_looked(tmp_path, articles_data, offline):
    spec = _wikitext_spec(tmp_path, articles_data)
    env = {k: v for k, v in offline.items() if k != "ARTICLES"}
    for command in ("plan", "preflight"):
        done = cli(command, str(spec), "--out", str(tmp_path / "exp"), env=env) \
            if command == "preflight" else cli(command, str(spec), env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"error: {spec}:" in done.stderr and "controlled.data" in done.stderr
        assert offline["LMLAB_DATA_DIR"] in done.stderr  # where it searched


def test_plan_and_train_fall_back_alike(tmp_path, articles_data, offline):
    """`plan` failed offline where `run --fallback-corpus` worked: plan, preflight, run and
    train now share the options (and their environment variables)."""
    spec = _wikitext_spec(tmp_path, articles_data)
    env = {k: v for k, v in offline.items() if k != "ARTICLES"}
    articles = offline["ARTICLES"]
    planned = cli("plan", str(spec), "--json", "--fallback-corpus", articles, env=env)
    assert planned.returncode == 0, planned.stderr
    assert "training on the local corpus" in planned.stderr
    assert json.loads(planned.stdout)["estimate_total_s"] > 0  # it timed real steps
    # The environment variables do what the flags do (here with --data-dir for the other).
    config = tmp_path / "one.yaml"
    cfg = dict(base_spec(articles_data)["controlled"], data={"dataset": "wikitext-2-raw-v1"},
               budget={"steps": 4},
               evaluation={"every_steps": 2, "max_batches": 2, "test_at_end": False})
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    trained = cli("train", str(config), "--out", str(tmp_path / "one"), "--data-dir",
                  env["LMLAB_DATA_DIR"],
                  env={"HF_ENDPOINT": env["HF_ENDPOINT"], "LMLAB_FALLBACK_CORPUS": articles})
    assert trained.returncode == 0, trained.stderr
    assert "training on the local corpus" in trained.stderr
    with Store.existing(tmp_path / "one") as store:
        (run,) = store.runs()
        assert run["status"] == "completed"
        assert run["config"]["data"]["dataset"] == "local"  # recorded as what it trained on
        assert Path(run["config"]["data"]["path"]).resolve() == Path(articles).resolve()


def test_a_missing_fallback_folder_is_a_usage_error(tmp_path, articles_data):
    spec = _wikitext_spec(tmp_path, articles_data)
    done = cli("plan", str(spec), "--fallback-corpus", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--fallback-corpus" in done.stderr and "does not exist" in done.stderr
