"""The lab notebook: a decision adopted as a baseline file, a later spec extending it (errors in
inherited values located in the baseline), notes, and the notebook's lineage across real tiny
experiments trained on the test-articles corpus."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmlab.cli import app
from lmlab.errors import UserError
from lmlab.execute.experiment import run_experiment
from lmlab.names import RESULT_SPEC
from lmlab.notebook.adopt import adopt
from lmlab.report import write_report
from lmlab.spec.baseline import load_baseline
from lmlab.spec.expand import load_plan
from lmlab.store import Store, add_note, samples
from test_report import CLEAR_WIN, WIN_CHECK, build_experiment
from test_spec import base_spec, write

RUNNER = CliRunner()


def lmlab(*args: str) -> tuple[int, str]:
    done = RUNNER.invoke(app, [str(a) for a in args], prog_name="lmlab", terminal_width=200,
                         env={"COLUMNS": "200"})
    if done.exception is not None and not isinstance(done.exception, (SystemExit, UserError)):
        raise done.exception
    if isinstance(done.exception, UserError):  # main() would print it and exit 2
        return 2, "\n".join(done.exception.lines())
    return done.exit_code, done.output


# -- the provisional rule and the baseline file, on synthetic stores (fast, exact verdicts) -----

def test_a_supported_decision_is_adopted_with_its_origin(tmp_path: Path) -> None:
    exp = build_experiment(tmp_path / "win", CLEAR_WIN, checks=[WIN_CHECK])
    done = adopt(exp)
    assert done.path == exp / "baseline.yaml"
    baseline, _ = load_baseline(done.path)
    assert not baseline.provisional
    o = baseline.origin
    assert (o.experiment, o.arm, o.selected_by, o.verdict) == ("lr-sweep", "lr3e-3", "best",
                                                               "supported")
    assert o.directory == str(exp.resolve()) and o.adopted_with
    assert baseline.adopted == {"optimizer.lr": 3e-3}
    assert baseline.controlled["optimizer"]["lr"] == 3e-3  # the arm's value applied
    assert baseline.controlled["train"]["batch_size"] == 8  # the controlled tree kept
    # Adopting the same decision again keeps the file (specs extending it recorded its digest).
    assert adopt(exp).digest == done.digest
    # --arm overrides the decision, and says so; a different decision is not written over
    # the existing file without --force.
    with pytest.raises(UserError, match="another decision"):
        adopt(exp, arm="lr1e-3")
    other = adopt(exp, arm="lr1e-3", out=tmp_path / "low.yaml")
    assert other.baseline.origin.selected_by == "--arm"
    assert other.baseline.controlled["optimizer"]["lr"] == 1e-3
    with pytest.raises(UserError, match="no arm 'nope'"):
        adopt(exp, arm="nope", out=tmp_path / "x.yaml")


def test_an_inconclusive_verdict_needs_provisional(tmp_path: Path) -> None:
    exp = build_experiment(tmp_path / "open", CLEAR_WIN)  # no checks: inconclusive
    code, text = lmlab("adopt", exp)
    assert code == 2
    assert "--provisional" in text and "inconclusive" in text
    assert not (exp / "baseline.yaml").exists()
    code, text = lmlab("adopt", exp, "--provisional", "--out", tmp_path / "b.yaml")
    assert code == 0, text
    assert "PROVISIONAL" in text
    baseline, _ = load_baseline(tmp_path / "b.yaml")
    assert baseline.provisional and baseline.origin.verdict == "inconclusive"
    # A spec built on it is valid, and told so at its extends line.
    code, text = lmlab("validate", _extending(tmp_path, tmp_path / "b.yaml", {}))
    assert code == 0, text
    assert re.search(r"warning: \S+next\.yaml:\d+ controlled\.extends: the baseline is "
                     r"provisional \(verdict inconclusive in lr-sweep\)", text)


# -- extends: the resolved tree, and errors where the value was written ---------------------------

def _extending(tmp_path: Path, baseline: Path, controlled: dict, name: str = "next.yaml") -> Path:
    spec = base_spec({"dataset": "wikitext-2-raw-v1"})
    spec["controlled"] = {"extends": str(baseline), **controlled}
    spec["budget"] = {"tokens": 8 * 256 * 2}  # the baseline's batch and seq_len
    return write(tmp_path, spec, name)


def test_extends_merges_and_locates_errors_in_the_file_that_wrote_them(tmp_path: Path) -> None:
    exp = build_experiment(tmp_path / "win", CLEAR_WIN, checks=[WIN_CHECK])
    base = adopt(exp).path
    spec = _extending(tmp_path, Path(base.name), {"model": {"dropout": 0.1}})
    (tmp_path / base.name).write_text(base.read_text())  # relative to the spec's folder
    plan = load_plan(spec)
    cfg = plan.runs[0].config
    assert cfg.model.dropout == 0.1  # the spec's override
    assert cfg.train.batch_size == 8 and cfg.train.seq_len == 256  # inherited
    assert plan.doc.extends.overridden == {"model.dropout": (0.0, 0.1)}
    code, text = lmlab("validate", spec)
    assert code == 0, text
    assert f"baseline: {tmp_path / base.name}" in text
    assert "controlled.model.dropout = 0.1 (baseline: 0.0)" in text
    assert "arm lr3e-3, verdict supported" in text

    # A bad inherited value: the baseline's file and line.
    bad = tmp_path / "bad-baseline.yaml"
    lines = base.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith("n_layer:"))
    lines[i] = lines[i].split(":")[0] + ": two"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        load_plan(_extending(tmp_path, bad, {}, "a.yaml"))
    e = info.value
    assert (e.file, e.line, e.field) == (str(bad), i + 1, "controlled.model.n_layer")
    # A bad override: the spec's own file and line, even where the baseline has the field.
    spec = _extending(tmp_path, base, {"model": {"n_layer": "three"}}, "b.yaml")
    with pytest.raises(UserError) as info:
        load_plan(spec)
    e = info.value
    assert e.file == str(spec) and e.field == "controlled.model.n_layer"
    assert "n_layer: three" in spec.read_text().splitlines()[e.line - 1]
    # A missing baseline: the spec's extends line.
    spec = _extending(tmp_path, tmp_path / "gone.yaml", {}, "c.yaml")
    with pytest.raises(UserError, match="no baseline file") as info:
        load_plan(spec)
    assert info.value.file == str(spec) and "extends:" in \
        spec.read_text().splitlines()[info.value.line - 1]
    # Not a baseline at all: named in the baseline file.
    (tmp_path / "plain.yaml").write_text("controlled: {}\n")
    with pytest.raises(UserError) as info:
        load_plan(_extending(tmp_path, tmp_path / "plain.yaml", {}, "d.yaml"))
    assert info.value.file == str(tmp_path / "plain.yaml")


# -- real tiny experiments: adopt -> extends -> lineage -------------------------------------------

def _tiny(articles_data: dict, name: str) -> dict:
    spec = base_spec(articles_data)
    spec["meta"]["name"] = name
    spec["preflight"] = {"enabled": False}
    spec["execution"] = {"pack": "auto"}  # both arms' seeds in one worker: a shorter test
    return spec


def test_adopt_extends_and_the_notebook_link_real_experiments(tmp_path: Path,
                                                               articles_data: dict) -> None:
    lab = tmp_path / "lab"
    first = _tiny(articles_data, "first")
    first["notes"] = ["planned before running: lr 1e-3 vs 3e-3"]
    run_experiment(load_plan(write(tmp_path, first, "first.yaml")), lab / "first")
    write_report(lab / "first")
    report_first = (lab / "first" / "report.md").read_text()
    assert "planned before running: lr 1e-3 vs 3e-3" in report_first

    done = adopt(lab / "first", provisional=True)  # whatever two seeds decided
    arm = done.baseline.origin.arm
    lr = {"slow": 1e-3, "fast": 3e-3}[arm]

    second = _tiny(articles_data, "second")
    second["meta"]["seeds"] = [0]
    second["controlled"] = {"extends": str(done.path), "model": {"dropout": 0.0}}
    # Arms that differ only in a number: one pack, one worker process.
    second["independent"] = {"variables": ["optimizer.weight_decay"],
                             "arms": {"wd0": {"optimizer.weight_decay": 0.0},
                                      "wd1": {"optimizer.weight_decay": 0.1}}}
    second["hypothesis"]["checks"] = []
    spec2 = write(tmp_path, second, "second.yaml")
    plan = load_plan(spec2)
    assert {r.config.optimizer.lr for r in plan.runs} == {lr}  # the adopted value
    run_experiment(plan, lab / "second")
    with Store.existing(lab / "second") as store:
        record = store.get_result(RESULT_SPEC)
        add_note(store, "wd1 looked noisier <script>")
        # Packed runs get their samples too (the worker's hook after train_pack returns).
        assert all(samples(store, r.run_id)["samples"] for r in plan.runs)
    assert record["baseline"]["digest"] == done.digest
    assert record["baseline"]["path"] == str(done.path)
    assert record["spec"]["controlled"]["optimizer"]["lr"] == lr  # the resolved tree
    write_report(lab / "second")
    md = (lab / "second" / "report.md").read_text()
    assert f"extends {done.path} (digest {done.digest})" in md
    assert f"adopted from experiment first ({(lab / 'first').resolve()}), arm {arm}" in md
    assert "PROVISIONAL" in md or done.baseline.origin.verdict == "supported"
    assert "### Samples" in md and "**wd0** (seed 0)" in md
    assert re.search(r"### Notes\n\n- \*\*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC:\*\* wd1 looked "
                     r"noisier", md)
    html = (lab / "second" / "report.html").read_text()
    assert "wd1 looked noisier &lt;script&gt;" in html

    # The baseline file changes afterwards: the second report still names what it read.
    done.path.write_text(done.path.read_text().replace("lmlab baseline", "edited baseline"))
    write_report(lab / "second")
    assert f"digest {done.digest}" in (lab / "second" / "report.md").read_text()
    # The first experiment's report is unchanged by what came after it.
    write_report(lab / "first")
    strip = lambda t: re.sub(r"Generated .* by", "", t)  # noqa: E731
    assert strip((lab / "first" / "report.md").read_text()) == strip(report_first)

    code, text = lmlab("notebook", lab)
    assert code == 0, text
    assert text.index("first") < text.index("second")
    nb = (lab / "notebook.md").read_text()
    rows = [line for line in nb.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert rows[0].startswith("| 1 | first |") and rows[1].startswith("| 2 | second |")
    assert rows[0].rstrip().endswith("| second |")  # extended by
    assert f"first (arm {arm}" in rows[1] and done.digest in rows[1]  # extends
    assert "Does a higher lr lower the loss?" in rows[0]
    assert f"adopted: arm {arm} as {done.path}" in rows[0]
    assert (lab / "notebook.html").read_text().count("<tr>") == 3
    assert yaml.safe_load(done.path.read_text())["origin"]["experiment"] == "first"


# -- figures besides mean and band; compare's overlay --------------------------------------------

def test_per_seed_and_lr_figures_draw_every_run_as_logged(tmp_path: Path, monkeypatch) -> None:
    import lmlab.report.seedplots as seedplots
    from lmlab.analysis.summary import load_experiment
    from lmlab.names import LR, TRAIN_LOSS
    from lmlab.report.plots import arm_colors

    exp_dir = build_experiment(tmp_path / "x", CLEAR_WIN, checks=[WIN_CHECK])
    drawn = {}
    real_save = seedplots._save

    def keep(fig, out, key, title, caption):
        drawn[key] = fig
        return real_save(fig, out, key, title, caption)

    monkeypatch.setattr(seedplots, "_save", keep)
    exp = load_experiment(exp_dir)
    colors = arm_colors(exp.arms)
    (tmp_path / "f").mkdir()
    seedplots.per_seed_figure(exp, colors, tmp_path / "f")
    seedplots.lr_figure(exp, colors, tmp_path / "f")
    train_ax = drawn["loss_per_seed"].axes[0]
    assert len(train_ax.lines) == len(exp.runs) == 6  # one line per run, no mean
    run = exp.runs[4]
    line = train_ax.lines[4]
    assert list(line.get_ydata()) == [r.value for r in run.curves[TRAIN_LOSS]]
    assert line.get_color() == colors[run.arm]
    assert line.get_linestyle() == train_ax.lines[1].get_linestyle()  # seed 1 alike in arms
    lr_ax = drawn["lr_schedule"].axes[0]
    assert [list(ln.get_ydata()) for ln in lr_ax.lines] == \
        [[r.value for r in run.curves[LR]] for run in exp.runs]

    write_report(exp_dir)
    md = (exp_dir / "report.md").read_text()
    assert "report_files/loss_per_seed.png" in md and "report_files/lr_schedule.png" in md
    assert "Learning-rate schedule applied" in md


def test_compare_writes_an_overlay_and_markdown(tmp_path: Path) -> None:
    a = build_experiment(tmp_path / "a", CLEAR_WIN, name="first")
    b = build_experiment(tmp_path / "b", CLEAR_WIN, name="second")
    code, text = lmlab("compare", a, b, "--out", tmp_path / "cmp")
    assert code == 0, text
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.startswith("## first vs second")
    assert "![Train and validation loss of both experiments](overlay.png)" in md
    assert "solid: first, dashed: second" in md
    png = (tmp_path / "cmp" / "overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Without --out: beside the first experiment.
    code, _ = lmlab("compare", a, b)
    assert (tmp_path / "compare-a-vs-b" / "compare.md").is_file()
