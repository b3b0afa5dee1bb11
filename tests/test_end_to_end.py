"""A real small experiment through the command line: `lmlab run` (preflight, every arm and seed,
each in its own process), then `lmlab report`, whose filled-in template must hold every heading
in order and exactly the store's numbers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from lmlab.store import Store
from test_report import is_subsequence, md_headings, md_table, parse_pm, template_headings
from test_spec import base_spec


def test_run_then_report_fills_the_template_from_the_store(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["budget"] = {"tokens": 8 * 32 * 20}
    spec["preflight"].update(lr=1e-2, steps=80)  # memorising 2 windows quickly needs a high lr
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "exp"

    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Not a terminal (as under CI, nohup or Slurm): plain progress lines, one per run start,
    # log interval and end, instead of a live bar that would print nothing.
    progress = done.stderr.splitlines()
    for rid in ("slow-s0", "slow-s1", "fast-s0", "fast-s1"):
        mine = [line for line in progress if line.startswith(f"{rid} ")]
        assert len(mine) >= 3 and "%" in mine[0], (rid, progress)
        assert "loss" in " ".join(mine) and "completed" in mine[-1] and "100%" in mine[-1]
    assert any(line.startswith("experiment ") and "100%" in line for line in progress)
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "report", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    md = (out / "report.md").read_text()
    expected = template_headings()
    # Not a memory experiment: the template's addendum ("use this section only for SDPA,
    # checkpointing, accumulation") is left out; everything before it must be there, in order.
    expected = expected[:expected.index("Memory / Systems Experiment Addendum")]
    assert len(expected) > 20 and is_subsequence(expected, md_headings(md))
    assert "wikitext-2-test-articles (not WikiText-2)" in md
    assert "☑ Pass" in md  # the preflight ran before the sweep and passed

    with Store.open(out) as store:
        runs = store.runs()
        assert store.get_result("experiment/preflight")["passed"] is True
        plan = store.get_result("experiment/plan")
        # The store's own numbers: a completed run's last (full-split) validation loss, and its
        # training tokens over its training seconds.
        final = {r["run_id"]: store.last_metric(r["run_id"], "val_loss") for r in runs}
    assert {r["status"] for r in runs} == {"completed"} and len(runs) == 4
    assert all(r["estimate_s"] > 0 for r in plan["runs"])  # the plan's expected wall-clock
    rows = {r["Config"]: r for r in md_table(md, "Config")}
    assert set(rows) == {"slow", "fast"}
    for arm, row in rows.items():
        finals = [final[r["run_id"]] for r in runs if r["arm"] == arm]
        mean, std, n = parse_pm(row["Final Val Loss"])
        assert n == 2
        assert mean == pytest.approx(np.mean(finals), abs=5e-5)
        assert std == pytest.approx(np.std(finals, ddof=1), abs=5e-5)
        tps = [r["summary"]["tokens"] / r["summary"]["train_s"] for r in runs if r["arm"] == arm]
        assert parse_pm(row["Tokens/sec"])[0] == pytest.approx(np.mean(tps), abs=0.5)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    assert (out / "summary.csv").read_text().startswith("arm,")
