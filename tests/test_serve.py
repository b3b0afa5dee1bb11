"""``lmlab serve``: the API answers what the records loader and the report say, the stores are
read read-only (a sweep writing at the same time is never blocked, and nothing it stores
changes), strings from specs and runs stay text, the charting library is the vendored one, and
the page, in a real headless Chromium, shows a run's curves growing while the run trains."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_hex
from starlette.testclient import TestClient

from lmlab.analysis.curves import arm_curves
from lmlab.analysis.records import status_row
from lmlab.analysis.summary import load_experiment
from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.names import TRAIN_LOSS, VAL_LOSS
from lmlab.report.format import sig
from lmlab.report.plots import arm_colors
from lmlab.serve import create_app, discover
from lmlab.serve.catalog import Catalog, read_only_store
from lmlab.serve.payload import DEFAULT_POINTS, thin
from lmlab.spec.schema import Spec
from lmlab.store import Store

XSS_ARM = '<img src=x onerror="window.__xss=1">lr<script>window.__xss=2</script>'
XSS_TEXT = "Does <b>bold</b> <script>window.__xss=3</script> stay text?"


# -- a synthetic experiment, written through the store as the executor writes one ----------------


def write_experiment(directory: Path, arms: dict[str, float], *, seeds: Sequence[int] = (0, 1),
                     steps: int = 60, objective: str = "Does a larger lr reach a lower loss?",
                     diverge: str | None = None, running: str | None = None,
                     failed: str | None = None) -> Path:
    """Arms named -> lr; every run completes, except the run ids given as diverged (a blow-up
    and a divergence event at 2/3 of the budget), running (half-way) or failed."""
    tokens_per_step = 8 * 32
    spec_doc = {
        "meta": {"name": directory.name, "category": "hyperparam", "seeds": list(seeds)},
        "objective": objective,
        "hypothesis": {"mechanism": "m", "prediction": "The larger lr ends lower.",
                       "falsification": "f"},
        "independent": {"variables": ["optimizer.lr"],
                        "arms": {a: {"optimizer.lr": lr} for a, lr in arms.items()}},
        "budget": {"steps": steps},
        "comparison_axis": "equal_steps",
        "expected_outcomes": ["lower"],
    }
    spec = Spec.model_validate(spec_doc)
    with Store.open(directory) as store:
        store.put_result("experiment/spec", {"path": "spec.yaml", "text": json.dumps(spec_doc),
                                             "hash": "h", "spec": spec.model_dump(mode="json")})
        plan = []
        for arm, lr in arms.items():
            for seed in seeds:
                rid = f"{arm}-s{seed}"
                cfg = RunConfig.model_validate({"optimizer": {"lr": lr}, "budget": {"steps": steps},
                                                "train": {"seed": seed, "batch_size": 8,
                                                          "seq_len": 32}})
                store.add_run(rid, arm, seed, cfg.to_json(), cfg.config_hash)
                plan.append({"run_id": rid, "arm": arm, "seed": seed,
                             "values": {"optimizer.lr": lr}})
        store.put_result("experiment/plan", {"axis": "equal_steps", "reference": next(iter(arms)),
                                             "variables": ["optimizer.lr"], "runs": plan})
        for i, p in enumerate(plan):
            rid = p["run_id"]
            store.set_status(rid, "running")
            if rid == failed:
                store.set_status(rid, "failed", error="Traceback ...\nRuntimeError: boom")
                continue
            last = steps // 2 if rid == running else (2 * steps // 3 if rid == diverge else steps)
            rows = []
            for s in range(1, last + 1):
                loss = 6.0 * math.exp(-s / 20) + 3.0 + 0.05 * i + 0.01 * math.sin(s)
                if rid == diverge and s > last - 3:
                    loss = 50.0 * (s - last + 4)
                values = {TRAIN_LOSS: loss, "grad_norm": 1.0 + 0.1 * math.cos(s), "lr": 1e-3}
                if s % 10 == 0:
                    values.update({"tokens_per_s": 1000.0 + i, "step_time_s": 0.25,
                                   "peak_mem_bytes": 2.0**27})
                    values.update({VAL_LOSS: loss + 0.1, "val_ppl": math.exp(loss + 0.1),
                                   "val_bpb": 1.0, "val_word_ppl": 10.0})
                rows.append((s, s * tokens_per_step, 0.25 * s, values))
            store.log_many(rid, rows)
            summary = {"steps": last, "tokens": last * tokens_per_step, "train_s": 0.25 * last,
                       "wall_s": 0.3 * last, "peak_mem_bytes": 2.0**27, "peak_mem_kind": "rss"}
            if rid == running:
                continue
            if rid == diverge:
                store.log_event(rid, last, last * tokens_per_step, 0.25 * last, "divergence",
                                {"loss": 150.0, "early_loss": 9.0, "factor": 3.0})
                store.set_status(rid, "diverged", summary=summary)
            else:
                store.set_status(rid, "completed", summary=summary)
    return directory


@pytest.fixture
def client() -> Callable[[Path], TestClient]:
    return lambda root: TestClient(create_app(root), base_url="http://127.0.0.1")


# -- what the API answers -------------------------------------------------------------------------


def test_discover_finds_experiments_but_not_run_folders(tmp_path: Path) -> None:
    for where in ("", "a", "group/b", "a/runs/a-s0", ".trash/c", "1/2/3/4/too-deep"):
        (tmp_path / where).mkdir(parents=True, exist_ok=True)
        Store.open(tmp_path / where).close()
    assert sorted(discover(tmp_path)) == [".", "a", "group/b"]


def test_the_api_says_what_the_records_and_the_report_say(tmp_path: Path, client) -> None:
    exp_dir = write_experiment(tmp_path / "sweep", {"lr1e-3": 1e-3, "lr3e-3": 3e-3},
                               diverge="lr3e-3-s1", running="lr1e-3-s1")
    write_experiment(tmp_path / "old", {"a": 1e-3}, seeds=(0,), failed="a-s0")
    api = client(tmp_path)
    listing = api.get("/api/experiments").json()
    assert [e["key"] for e in listing["experiments"]] == ["old", "sweep"]  # newest write first
    sweep = listing["experiments"][1]
    assert sweep["statuses"] == {"running": 1, "completed": 2, "diverged": 1}
    assert sweep["objective"] == "Does a larger lr reach a lower loss?" and sweep["n_runs"] == 4

    answer = api.get("/api/experiment", params={"key": "sweep"})
    assert answer.status_code == 200
    body = answer.json()
    exp = load_experiment(exp_dir)
    assert body["x_key"] == "step" and body["axis"] == "equal_steps"
    colors = {arm: to_hex(c) for arm, c in arm_colors(exp.arms).items()}
    assert [(a["name"], a["color"], a["values"]) for a in body["arms"]] == [
        ("lr1e-3", colors["lr1e-3"], {"optimizer.lr": "0.001"}),
        ("lr3e-3", colors["lr3e-3"], {"optimizer.lr": "0.003"})]
    for row, record in zip(body["runs"], exp.runs, strict=True):
        expected = status_row(record)
        assert row["run_id"] == expected["run_id"] and row["status"] == expected["status"]
        assert row["color"] == colors[record.arm]
        assert row["text"]["final_val_loss"] == sig(expected["final_val_loss"])
        assert row["text"]["steps"] == f"{expected['steps']:,}"
    by_id = {r["run_id"]: r for r in body["runs"]}
    assert by_id["lr1e-3-s1"]["progress"] == pytest.approx(0.5)  # 30 of 60 steps
    assert by_id["lr1e-3-s1"]["text"]["final_val_loss"] == "—"  # not completed: no final value
    assert by_id["lr3e-3-s1"]["text"]["status"] == "diverged at step 40"
    assert by_id["lr3e-3-s1"]["instability"] == [
        {"kind": "divergence", "step": 40, "tokens": 40 * 256, "wall_s": 10.0, "loss": 150.0}]

    panels = {p["metric"]: p for p in body["panels"]}
    assert list(panels) == ["train_loss", "val_loss", "grad_norm", "lr", "tokens_per_s",
                            "peak_mem_bytes"]
    rows = exp.runs[1].curves[TRAIN_LOSS]
    assert panels[TRAIN_LOSS]["runs"]["lr1e-3-s1"] == [[r.step for r in rows],
                                                       [r.value for r in rows]]
    band = arm_curves(exp, TRAIN_LOSS, "step")["lr3e-3"]
    assert band.n_seeds == 1  # the diverged seed is not in the arm's mean, as in the report
    got = panels[TRAIN_LOSS]["arms"]["lr3e-3"]
    assert got["data"][0] == [int(x) for x in band.x]
    assert got["data"][1] == pytest.approx(list(band.mean))

    # Curves against another axis; an unchanged store answers 304 to the page's ETag.
    wall = api.get("/api/experiment", params={"key": "sweep", "x": "wall_s"}).json()
    assert wall["panels"][0]["runs"]["lr1e-3-s0"][0][:2] == [0.25, 0.5]
    held = {"If-None-Match": answer.headers["etag"]}
    again = api.get("/api/experiment", params={"key": "sweep"}, headers=held)
    assert again.status_code == 304 and not again.content
    with Store.open(exp_dir) as store:
        store.log_metrics("lr1e-3-s1", 31, 31 * 256, 7.75, {TRAIN_LOSS: 4.0})
    grown = api.get("/api/experiment", params={"key": "sweep"}, headers=held)
    assert grown.status_code == 200
    assert grown.json()["panels"][0]["runs"]["lr1e-3-s1"][0][-1] == 31

    old = {r["run_id"]: r
           for r in api.get("/api/experiment", params={"key": "old"}).json()["runs"]}
    assert old["a-s0"]["error"] == "RuntimeError: boom"


def test_the_api_refuses_what_it_does_not_know(tmp_path: Path, client) -> None:
    write_experiment(tmp_path / "sweep", {"a": 1e-3}, seeds=(0,))
    api = client(tmp_path)
    assert api.get("/api/experiment", params={"key": "nope"}).status_code == 404
    # A key is looked up among the experiments found, never joined onto a path.
    for key in ("../../etc", "/etc", "sweep/../sweep", ""):
        assert api.get("/api/experiment", params={"key": key}).status_code == 404
    # The served directory may itself be the experiment: its key is ".".
    alone = client(tmp_path / "sweep")
    assert [e["key"] for e in alone.get("/api/experiments").json()["experiments"]] == ["."]
    assert alone.get("/api/experiment", params={"key": "."}).json()["name"] == "sweep"
    assert api.get("/api/experiment", params={"key": "sweep", "x": "bogus"}).status_code == 400
    assert api.get("/api/experiment", params={"key": "sweep", "points": "many"}).status_code == 400
    # Another host name (a page elsewhere rebinding its DNS to 127.0.0.1) is refused.
    other = TestClient(create_app(tmp_path), base_url="http://attacker.example")
    assert other.get("/api/experiments").status_code == 400
    page = api.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]


def test_a_reload_reads_again_only_the_runs_that_may_have_changed(tmp_path: Path) -> None:
    directory = write_experiment(tmp_path / "e", {"a": 1e-3}, running="a-s1")
    catalog = Catalog(tmp_path)
    first = {r.run_id: r for r in catalog.load(directory).experiment.runs}
    with Store.open(directory) as store:
        store.log_metrics("a-s1", 31, 31 * 256, 7.75, {TRAIN_LOSS: 4.0})
    second = {r.run_id: r for r in catalog.load(directory).experiment.runs}
    assert second["a-s1"].curves[TRAIN_LOSS][-1].step == 31  # the running run: read again
    assert second["a-s0"].curves is first["a-s0"].curves  # the completed one: reused
    # The completed run is started again (a retry): its old rows go, and the change shows.
    with Store.open(directory) as store:
        store.truncate_after("a-s0", 10)
        store.set_status("a-s0", "running")
    third = {r.run_id: r for r in catalog.load(directory).experiment.runs}
    assert third["a-s0"].status == "running" and third["a-s0"].curves[TRAIN_LOSS][-1].step == 10


def test_thinning_keeps_spikes_gaps_and_ends() -> None:
    y = np.sin(np.arange(100_000) / 500.0)
    y[12_345], y[77_777], y[50_000] = 40.0, -30.0, np.nan
    idx = thin(np.arange(len(y)), y, 1000)
    assert len(idx) <= 1000 + 4 and idx[0] == 0 and idx[-1] == len(y) - 1
    assert {12_345, 77_777, 50_000} <= set(idx.tolist())
    assert np.all(np.diff(idx) > 0)
    assert thin(np.arange(10), np.ones(10), 1000).tolist() == list(range(10))


# -- read-only: a sweep writing at the same time is neither blocked nor changed ------------------


def test_a_read_only_store_cannot_write_or_create(tmp_path: Path) -> None:
    write_experiment(tmp_path / "e", {"a": 1e-3}, seeds=(0,))
    with Store(tmp_path / "e", read_only=True) as store:
        assert [r["run_id"] for r in store.runs()] == ["a-s0"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.log_metrics("a-s0", 999, 1, 1.0, {TRAIN_LOSS: 1.0})
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        Store(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
    with sqlite3.connect(tmp_path / "e" / "lmlab.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UserError, match="schema version 99"):
        read_only_store(tmp_path / "e")
    # The dashboard lists it with the reason, and refuses to draw it.
    api = TestClient(create_app(tmp_path), base_url="http://127.0.0.1")
    (entry,) = api.get("/api/experiments").json()["experiments"]
    assert "schema version 99" in entry["error"]
    answer = api.get("/api/experiment", params={"key": "e"})
    assert answer.status_code == 503 and "upgrade lmlab" in answer.json()["error"]


def test_a_store_of_an_older_schema_is_shown_and_left_as_it_is(tmp_path: Path, client,
                                                               monkeypatch) -> None:
    """A store that lmlab 0.1 wrote (schema 1) is read as it is: a reader does not migrate."""
    import lmlab.store.db as dbmod

    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:1])
    write_experiment(tmp_path / "old", {"a": 1e-3}, seeds=(0,))
    monkeypatch.undo()
    answer = client(tmp_path).get("/api/experiment", params={"key": "old"})
    assert answer.status_code == 200 and answer.json()["runs"][0]["status"] == "completed"
    with sqlite3.connect(tmp_path / "old" / "lmlab.sqlite") as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            == ("1",)


def test_serving_changes_no_byte_of_a_finished_store(tmp_path: Path, client) -> None:
    write_experiment(tmp_path / "e", {"a": 1e-3, "b": 2e-3})
    db = tmp_path / "e" / "lmlab.sqlite"
    with Store(db):  # a writer's last close checkpoints the WAL into the file
        pass
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    api = client(tmp_path)
    for x in ("step", "tokens", "wall_s"):
        assert api.get("/api/experiment", params={"key": "e", "x": x}).status_code == 200
    assert api.get("/api/experiments").status_code == 200
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


_WRITER = """
import sys
from lmlab.store import Store
store = Store(sys.argv[1])
# No waiting at all: if a reader ever held a lock this writer needs, a write would fail now.
store._conn.execute("PRAGMA busy_timeout = 0")
for step in range(1, int(sys.argv[2]) + 1):
    store.log_many("w-s0", [(step, step * 256, step * 0.01,
                              {"train_loss": 5.0 - step * 1e-3, "grad_norm": 1.0, "lr": 1e-3})])
    if step % 50 == 0:
        store.set_status("w-s0", "running")
store.set_status("w-s0", "completed", summary={"steps": int(sys.argv[2])})
print("done")
"""


def test_a_run_writes_while_the_server_reads(tmp_path: Path, client) -> None:
    directory = tmp_path / "live"
    steps = 600
    with Store.open(directory) as store:
        cfg = RunConfig.model_validate({"budget": {"steps": steps}})
        store.add_run("w-s0", "w", 0, cfg.to_json(), cfg.config_hash)
        store.set_status("w-s0", "running")
    api = client(tmp_path)
    # The reader holds a read transaction open across the writer's commits, too.
    reader = sqlite3.connect(f"{(directory / 'lmlab.sqlite').as_uri()}?mode=ro", uri=True)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM metrics").fetchone()
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, codes = [], set()
    while True:
        finished = writer.poll() is not None
        answer = api.get("/api/experiment", params={"key": "live", "x": "step"})
        codes.add(answer.status_code)
        if answer.status_code == 200:
            runs = answer.json()["panels"][0]["runs"] if answer.json()["panels"] else {}
            seen.append(len(runs["w-s0"][0]) if runs else 0)
        if finished:
            break
    reader.execute("COMMIT")
    reader.close()
    out, err = writer.communicate()
    assert writer.returncode == 0 and out.strip() == "done", err[-2000:]
    assert codes == {200}
    assert seen == sorted(seen), "a later read saw fewer rows than an earlier one"
    assert len(set(seen)) > 2, seen  # it did read while the run wrote
    final = api.get("/api/experiment", params={"key": "live", "x": "step"}).json()
    assert final["runs"][0]["status"] == "completed"
    assert final["panels"][0]["runs"]["w-s0"][0] == list(range(1, steps + 1))
    with Store(directory) as store:
        assert store._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert len(store.metrics("w-s0", [TRAIN_LOSS])[TRAIN_LOSS]) == steps


# -- the command ----------------------------------------------------------------------------------


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def test_serve_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    done = _cli("serve", str(tmp_path / "nope"))
    assert done.returncode == 2 and "nope: not a directory" in done.stderr
    assert "Traceback" not in done.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        done = _cli("serve", str(tmp_path), "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert done.returncode == 2 and "--port: cannot listen on 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


class Server:
    """``lmlab serve ROOT --port 0`` in a subprocess, and the URL it printed."""

    def __init__(self, root: Path, refresh: float = 0.3) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmlab.cli", "serve", str(root), "--port", "0",
             "--refresh", str(refresh)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if m is None:
            self.proc.kill()
            raise AssertionError(f"no URL printed: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = m.group(0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[Path], Server]]:
    started: list[Server] = []

    def start(root: Path) -> Server:
        started.append(Server(root))
        return started[-1]

    yield start
    for s in started:
        s.close()


def test_serve_answers_over_http(tmp_path: Path, server) -> None:
    import urllib.request

    write_experiment(tmp_path / "sweep", {"a": 1e-3}, seeds=(0,))
    url = server(tmp_path).url
    with urllib.request.urlopen(url + "api/experiments", timeout=30) as r:
        assert [e["key"] for e in json.load(r)["experiments"]] == ["sweep"]
    with urllib.request.urlopen(url + "static/vendor/uplot/uPlot.iife.min.js", timeout=30) as r:
        assert r.read().startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32) */")


def test_the_vendored_chart_library_is_the_one_its_readme_names() -> None:
    vendor = Path(__file__).resolve().parents[1] / "src/lmlab/serve/static/vendor/uplot"
    readme = (vendor / "README.md").read_text()
    listed = dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", readme))
    assert set(listed) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    for name, digest in listed.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (vendor / "LICENSE").read_text()
    page = (vendor.parents[1] / "index.html").read_text()
    assert "http:" not in page and "https:" not in page  # nothing fetched from elsewhere


# -- in a real browser -----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (apt-get install -y "
                        "chromium chromium-driver)")
        pytest.skip("chromium / chromium-driver not installed (apt-get install -y chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without these Chromium waits on the network (updates, sync) and hangs on closed machines.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1500",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Explicit driver and browser paths: Selenium never tries to download either.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _panel(driver: Any, metric: str) -> dict[str, str] | None:
    return driver.execute_script(
        "const p = document.querySelector(`.panel[data-metric='${arguments[0]}']`);"
        "return p ? {...p.dataset} : null;", metric)


def _run_status(driver: Any, run_id: str) -> str | None:
    return driver.execute_script(
        "const r = document.querySelector(`#runs tr[data-run='${arguments[0]}']`);"
        "return r ? r.dataset.status : null;", run_id)


def _console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_the_page_shows_a_run_growing_while_it_trains(tmp_path: Path, browser, server) -> None:
    """A real `lmlab train` run (6 s of training, whatever the machine's speed) watched from the
    page: the curve appears, grows while the run is running, and ends with every step."""
    root = tmp_path / "lab"
    root.mkdir()
    config = tmp_path / "live.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "local", "name": "wikitext-2-test-articles",
                 "path": str(Path(os.environ["LMLAB_DATA_DIR"]) / "wikitext-2-test-articles")},
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32},
        "train": {"batch_size": 4, "seq_len": 32},
        "budget": {"wall_clock_s": 6},
        "evaluation": {"every_seconds": 1, "max_batches": 2, "test_at_end": False,
                       "diagnostics": {"every_steps": 1000}},
        "cadence": {"log_every_steps": 2, "checkpoint_every_steps": 100_000},
    }))
    url = server(root).url
    browser.get(url)
    _wait(lambda: browser.find_elements("css selector", "#list"), 60, "the experiment list")
    train = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "train", str(config), "--out",
                              str(root / "live")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        link = _wait(lambda: browser.find_elements("css selector", "tr[data-key='live'] a"), 120,
                     "the new experiment in the list")
        link[0].click()  # the list is updated in place: the link outlives the polls
        seen: list[int] = []

        def grown_twice() -> bool:
            panel = _panel(browser, TRAIN_LOSS)
            if panel and _run_status(browser, "live-s0") == "running":
                n = int(panel["points"])
                if not seen or n > seen[-1]:
                    seen.append(n)
            return len(seen) >= 3

        _wait(grown_twice, 120, "the train-loss curve to grow while the run trains")
        _, err = train.communicate(timeout=300)
        assert train.returncode == 0, err[-3000:]
    finally:
        if train.poll() is None:
            train.kill()
    with Store(root / "live", read_only=True) as store:
        rows = store.metrics("live-s0", [TRAIN_LOSS])[TRAIN_LOSS]
    steps = len(rows)
    # every step, or on a fast machine (more steps than a curve is drawn with) the thinned ones
    drawn = len(thin(np.array([r.tokens for r in rows]), np.array([r.value for r in rows]),
                     DEFAULT_POINTS))
    _wait(lambda: _run_status(browser, "live-s0") == "completed", 30, "the completed status")
    _wait(lambda: int(_panel(browser, TRAIN_LOSS)["points"]) == drawn, 30, "every step drawn")
    assert _panel(browser, VAL_LOSS) is not None and int(_panel(browser, VAL_LOSS)["points"]) >= 2
    assert seen[0] < seen[-1] <= steps
    assert not _console_errors(browser)
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_page_keeps_strings_as_text_and_its_controls_work(tmp_path: Path, browser,
                                                              server) -> None:
    write_experiment(tmp_path / "xss", {XSS_ARM: 1e-3, "plain": 3e-3}, objective=XSS_TEXT,
                     diverge="plain-s1")
    url = server(tmp_path / "xss").url  # the served directory is the experiment itself
    browser.get(url + "#/e/.")
    _wait(lambda: _panel(browser, TRAIN_LOSS), 60, "the train-loss panel")
    body = browser.find_element("css selector", "body").text
    assert XSS_TEXT in body and XSS_ARM in body  # shown, as text
    assert browser.execute_script("return window.__xss") is None  # and never run
    assert not browser.find_elements("css selector", "main img, main script, main b")

    # Per seed: one line per run (4). Mean and band: one per arm, plus the diverged seed.
    assert _panel(browser, TRAIN_LOSS)["series"] == "4"
    browser.find_element("css selector", "#mode button[data-mode='band']").click()
    assert _panel(browser, TRAIN_LOSS)["series"] == "3"
    assert "mode=band" in browser.current_url
    # Hiding an arm from the legend removes its lines.
    browser.find_element("css selector", "#legend .arm[data-arm='plain']").click()
    assert _panel(browser, TRAIN_LOSS)["series"] == "1"

    # Zoom: a drag on one chart zooms every panel to the same x-range; a double-click resets.
    from selenium.webdriver.common.action_chains import ActionChains

    over = browser.find_element("css selector", ".panel[data-metric='train_loss'] .u-over")
    ActionChains(browser).move_to_element_with_offset(over, -80, 0).click_and_hold() \
        .move_by_offset(120, 0).release().perform()
    zoom = _wait(lambda: _panel(browser, VAL_LOSS)["zoom"], 10, "a zoomed x-range")
    lo, hi = map(float, zoom.split(","))
    assert 0 < lo < hi < 60
    assert _panel(browser, TRAIN_LOSS)["zoom"] == zoom
    ActionChains(browser).double_click(over).perform()
    _wait(lambda: _panel(browser, VAL_LOSS)["zoom"] == "", 10, "the zoom reset")
    assert not _console_errors(browser)
