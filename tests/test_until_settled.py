"""Seeds until settled, on real runs: a clear effect stops before the cap, with its looks, its
curve-statistic and expected-outcome checks judged in section 9; an A/A pair reaches the cap
inconclusive, resuming after a Ctrl-C in the middle of a round; the plan shows the rounds; and
the design cannot change once the first look has been taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmlab import driver
from lmlab.analysis.summary import load_experiment
from lmlab.errors import UserError
from lmlab.names import RESULT_SEQUENTIAL
from lmlab.report.inputs import gather
from lmlab.report.render import render_markdown
from lmlab.report.sections import context
from lmlab.spec.expand import load_plan
from lmlab.store import Store
from test_report import md_table
from test_spec import base_spec, write

STEPS = 64  # long enough that a Ctrl-C seen mid-run lands before the run ends


def report_md(out) -> str:
    """The report's Markdown without its figures (drawn and checked in test_report)."""
    return render_markdown(context(gather(load_experiment(out))), out)


def tiny(articles_data: dict) -> dict:
    spec = base_spec(articles_data)
    spec["budget"] = {"tokens": 8 * 32 * STEPS}
    # No samples: a run's tail after training would let a Ctrl-C meant for mid-run land after it.
    spec["evaluation"].update(every_steps=8, samples={"prompts": []})
    spec["cadence"].update(checkpoint_every_steps=4)
    spec["preflight"] = {"enabled": False}
    return spec


def test_a_clear_effect_stops_before_the_cap(tmp_path, articles_data):
    spec = tiny(articles_data)
    spec["independent"]["arms"] = {"slow": {"optimizer.lr": 1e-3}, "fast": {"optimizer.lr": 1e-2}}
    spec["expected_outcomes"] = [
        "the fast arm is not less stable",
        {"outcome": "the fast arm's train loss over the last quarter of its tokens is lower",
         "check": {"curve": {"metric": "train_loss", "reduce": "mean",
                             "tokens": ["75%", "100%"]}, "arm": "fast", "op": "<",
                   "than": "slow"}}]
    spec["analysis"] = {"until_settled": True, "max_seeds": 4, "seeds_per_round": 1}
    plan = load_plan(write(tmp_path, spec))
    out = tmp_path / "exp"

    result = driver.run(plan, out)
    record = result.sequential
    assert record is not None and record["stopped"] is not None
    stopped = record["stopped"]["look"]
    assert stopped < 3 and record["stopped"]["reason"] == "every check is supported or refuted"
    assert [look["look"] for look in record["looks"]] == list(range(1, stopped + 1))
    with Store.open(out) as store:
        seeds = {r["seed"] for r in store.runs()}
    assert seeds == set(range(stopped + 1))  # no round beyond the one that settled it

    md = report_md(out)
    section9 = md.split("## 9. Interpretation")[1].split("## 10.")[0]
    win = md_table(section9, "Check")[0]
    assert win["Verdict"] == "SUPPORTED" and win["Analysis"].startswith("paired (")
    assert "Looks of the until-settled experiment" in section9
    assert f"Stopped after look {stopped} of at most 3" in section9
    looks = md_table(section9, "Look")
    assert {row["Look"] for row in looks} == {str(k) for k in range(1, stopped + 1)}
    # The expected outcome's curve statistic is judged next to its prose; the prose one is
    # listed as not machine-checked.
    assert ("\u201cthe fast arm's train loss over the last quarter of its tokens is lower\u201d: "
            "MET — mean train_loss over tokens [75%, 100%]: fast < slow") in section9
    assert "\u201cthe fast arm is not less stable\u201d: not machine-checked" in section9
    diffs = md_table(section9, "Check | Seed")
    assert any(r["Check"].startswith("mean train_loss over tokens") for r in diffs)

    # The design was fixed before the first look: asking for another cap is refused.
    with pytest.raises(UserError, match="fixed before its first look"):
        driver.run(plan, out, max_seeds=6)


def _wait_for_round_two(out, deadline: float) -> None:
    while time.time() < deadline:
        if (out / "lmlab.sqlite").exists():
            with Store.open(out) as store:
                record = store.get_result(RESULT_SEQUENTIAL) or {}
                rows = store.metrics("b-s1", ["train_loss"]).get("train_loss", []) \
                    if store.run("b-s1") else []
                running = (store.run("b-s1") or {}).get("status") == "running"
            if record.get("rounds_started") == 2 and 4 <= len(rows) < STEPS and running:
                return
        time.sleep(0.05)
    raise AssertionError("round 2 never started")


def test_an_a_a_pair_reaches_the_cap_inconclusive_and_resumes_mid_round(tmp_path,
                                                                         articles_data):
    spec = tiny(articles_data)
    spec["meta"]["seeds"] = [0]
    spec["independent"]["arms"] = {"a": {"optimizer.lr": 1e-3}, "b": {"optimizer.lr": 1e-3}}
    spec["hypothesis"]["checks"] = [{"metric": "final_val_loss", "arm": "b", "op": "<",
                                     "than": "a"}]
    # Every arm draws its own random numbers: a real A/A pair, seed noise and all.
    spec["controlled"]["seed_policy"] = {"streams": "per_arm"}
    spec["analysis"] = {"until_settled": True, "max_seeds": 2}
    path = write(tmp_path, spec)
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "lmlab.cli", "run", str(path), "--out", str(out)]

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_for_round_two(out, time.time() + 240)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the middle of the second round
        proc.wait(timeout=120)
    assert proc.returncode != 0, proc.stderr.read().decode()[-3000:]  # interrupted mid-round
    with Store.open(out) as store:
        record = store.get_result(RESULT_SEQUENTIAL)
        states = {r["run_id"]: r["status"] for r in store.runs()}
    assert record["rounds_started"] == 2 and len(record["looks"]) == 1
    assert {states["a-s0"], states["b-s0"]} == {"completed"}
    assert states["b-s1"] in ("interrupted", "running", "pending"), states

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Store.open(out) as store:
        record = store.get_result(RESULT_SEQUENTIAL)
        runs = store.runs()
        steps = {r["run_id"]: [row.step for row in store.metrics(r["run_id"], ["train_loss"])
                               ["train_loss"]] for r in runs}
    assert {r["status"] for r in runs} == {"completed"} and len(runs) == 4
    assert all(s == list(range(1, STEPS + 1)) for s in steps.values())  # no row lost or twice
    assert [look["look"] for look in record["looks"]] == [1, 2]
    assert "cap of 2 seeds per arm was reached" in record["stopped"]["reason"]
    assert record["looks"][-1]["verdict"] == "inconclusive"

    md = report_md(out)
    check = md_table(md, "Check")[0]
    assert check["Verdict"] == "INCONCLUSIVE" and "A/A" in check["Why"]
    assert check["Analysis"] == "Welch (unpaired)"  # per-arm streams share no random numbers
    assert "streams: per_arm" in md


def test_the_plan_lists_the_rounds_and_their_boundaries(tmp_path, articles_data):
    spec = tiny(articles_data)
    path = write(tmp_path, spec)
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "plan", str(path), "--json",
                           "--no-estimate", "--until-settled", "--max-seeds", "5"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    rounds = record["rounds"]
    assert [r["seeds"] for r in rounds] == [[0, 1], [2, 3], [4]]
    assert [r["seeds_per_arm"] for r in rounds] == [2, 4, 5]
    assert len(record["runs"]) == 10  # every run the rounds may add
    levels = [r["boundary_p"] for r in rounds]
    assert levels == sorted(levels) and levels[-1] < 0.05  # strict early, near alpha at the cap

    plan = load_plan(path)
    design = driver.design_of(plan, True, 5)
    estimates = {r.run_id: 10.0 for r in load_plan(path).runs}
    estimates.update({f"{arm}-s{s}": 10.0 for arm in ("slow", "fast") for s in (2, 3, 4)})
    worst = driver.plan_rounds(plan, design, estimates)
    assert [r["cumulative_s"] for r in worst] == [40.0, 80.0, 100.0]

    bad = subprocess.run([sys.executable, "-m", "lmlab.cli", "plan", str(path),
                          "--no-estimate", "--until-settled", "--max-seeds", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-seeds" in bad.stderr and "Traceback" not in bad.stderr
