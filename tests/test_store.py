"""The experiment store (SQLite) and provenance capture."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from lmlab.analysis.stats import summarize
from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.store import Migration, Store, capture, hardware_summary
from lmlab.store import db as dbmod

CONFIG = json.dumps({"optimizer": {"lr": 0.001}, "train": {"seed": 0}})
LATEST = len(dbmod.MIGRATIONS)


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "exp") as s:
        s.add_run("a-s0", "a", 0, CONFIG, "hash-a")
        s.add_run("b-s0", "b", 0, CONFIG, "hash-b")
        yield s


# -- opening and schema --------------------------------------------------------------------


def test_open_creates_directory_and_sets_up_connection(tmp_path: Path) -> None:
    exp = tmp_path / "deep" / "exp"
    with Store.open(exp) as s:
        assert (exp / "lmlab.sqlite").is_file()
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s._conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
        assert s.schema_version == LATEST
        s.put_result("x", 1)
    # Store(dir) finds the file inside an existing directory; data survives reopening.
    with Store(exp) as s:
        assert s.path == exp / "lmlab.sqlite"
        assert s.get_result("x") == 1


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        s.runs()


def test_migration_list_upgrades_an_existing_database(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path) as s:
        s.add_run("r", "a", 0, CONFIG, "h")
        s.log_metrics("r", 1, 10, 0.5, {"loss": 3.0})
        assert s.schema_version == LATEST
    new = LATEST + 1

    applied: list[int] = []

    def v2(conn: sqlite3.Connection) -> None:
        applied.append(2)
        # Without IF NOT EXISTS: applying this twice would fail, so a second open proves the
        # migration is not re-run.
        conn.execute("CREATE TABLE notes (run_id TEXT REFERENCES runs(run_id), text TEXT)")

    monkeypatch.setattr(dbmod, "MIGRATIONS", [*dbmod.MIGRATIONS, Migration(new, "notes", v2)])
    with Store.open(tmp_path) as s:
        assert s.schema_version == new
        assert s._conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0
        assert s.last_metric("r", "loss") == 3.0
        assert s.run("r")["status"] == "pending"
    with Store.open(tmp_path) as s:
        assert s.schema_version == new
    assert applied == [2]


def test_a_store_written_by_lmlab_0_1_is_migrated_to_todays_config_sections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.1 stored run configs with ``eval`` (cadences inside) and a top-level ``diagnostics``;
    opening the store moves them to ``evaluation`` / ``evaluation.diagnostics`` / ``cadence``,
    and the run keeps its identity."""
    old_tree = RunConfig().model_dump(mode="json")
    evaluation = old_tree.pop("evaluation")
    old_tree["diagnostics"] = evaluation.pop("diagnostics")
    old_tree["eval"] = {**evaluation, **old_tree.pop("cadence")}
    old_tree["eval"]["log_every_steps"] = 3
    old_tree["diagnostics"]["every_steps"] = 7
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:1])
    with Store.open(tmp_path) as s:
        s.add_run("r", "a", 0, json.dumps(old_tree), "0.1-hash")
        s.put_result("experiment/spec", {"text": "...", "spec": {
            "meta": {"name": "old"}, "evaluation": {"every_steps": 5, "log_every_steps": 3}}})
        assert s.schema_version == 1
    monkeypatch.undo()
    with Store.open(tmp_path) as s:
        assert s.schema_version == LATEST
        run = s.run("r")
        spec = s.get_result("experiment/spec")["spec"]
    assert spec["evaluation"] == {"every_steps": 5} and spec["cadence"] == {"log_every_steps": 3}
    assert "eval" not in run["config"] and "diagnostics" not in run["config"]
    cfg = RunConfig.model_validate(run["config"])
    assert cfg.cadence.log_every_steps == 3 and cfg.evaluation.diagnostics.every_steps == 7
    assert run["config_hash"] == cfg.config_hash
    # The tree as 0.1 wrote it still validates (a config file or checkpoint of that age).
    assert RunConfig.model_validate(old_tree) == cfg


def test_failed_migration_leaves_database_unchanged(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path) as s:
        s.put_result("kept", True)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(dbmod, "MIGRATIONS",
                        [*dbmod.MIGRATIONS, Migration(LATEST + 1, "bad", broken)])
    with pytest.raises(RuntimeError, match="migration bug"):
        Store.open(tmp_path)
    monkeypatch.undo()
    with Store.open(tmp_path) as s:
        assert s.schema_version == LATEST
        assert s.get_result("kept") is True
        tables = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master")}
        assert "half_done" not in tables


def test_newer_database_is_a_user_error(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s._conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UserError, match="schema version 99"):
        Store.open(tmp_path)


def test_migration_versions_must_be_contiguous(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gap = Migration(LATEST + 2, "skips one", lambda conn: None)
    monkeypatch.setattr(dbmod, "MIGRATIONS", [*dbmod.MIGRATIONS, gap])
    with pytest.raises(RuntimeError, match="without gaps"):
        Store.open(tmp_path)


# -- runs ----------------------------------------------------------------------------------


def test_add_run_is_idempotent_and_keeps_existing_rows(store: Store) -> None:
    store.set_status("a-s0", "completed", summary={"val_loss": 4.2})
    assert store.add_run("a-s0", "other", 9, json.dumps({"changed": True}), "other") is False
    run = store.run("a-s0")
    assert run is not None
    assert (run["arm"], run["seed"], run["config_hash"]) == ("a", 0, "hash-a")
    assert run["config"] == json.loads(CONFIG)
    assert run["status"] == "completed"
    assert run["summary"] == {"val_loss": 4.2}
    assert store.add_run("a-s1", "a", 1, CONFIG, "hash-a") is True
    assert [r["run_id"] for r in store.runs()] == ["a-s0", "b-s0", "a-s1"]
    assert [r["run_id"] for r in store.runs(arm="a")] == ["a-s0", "a-s1"]
    assert [r["run_id"] for r in store.runs(status="pending")] == ["b-s0", "a-s1"]
    assert store.run("missing") is None


def test_add_run_rejects_bad_input(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown run status"):
        store.add_run("x", "a", 0, CONFIG, "h", status="done")
    with pytest.raises(json.JSONDecodeError):
        store.add_run("x", "a", 0, "{not json", "h")
    assert store.run("x") is None


def test_status_check_is_enforced_by_the_database(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store._conn.execute("UPDATE runs SET status = 'bogus' WHERE run_id = 'a-s0'")


def test_status_lifecycle_timestamps_error_and_summary(store: Store) -> None:
    assert store.run("a-s0")["started_at"] is None
    store.set_status("a-s0", "running")
    first = store.run("a-s0")
    assert first["started_at"] is not None and first["ended_at"] is None
    datetime.fromisoformat(first["started_at"])

    store.set_status("a-s0", "interrupted", error="killed", summary={"step": 50})
    stopped = store.run("a-s0")
    assert stopped["ended_at"] is not None
    assert stopped["error"] == "killed"
    assert stopped["summary"] == {"step": 50}

    # Resuming keeps the original start, reopens the run and clears the stale error.
    store.set_status("a-s0", "running")
    resumed = store.run("a-s0")
    assert resumed["started_at"] == first["started_at"]
    assert resumed["ended_at"] is None
    assert resumed["error"] is None
    assert resumed["summary"] == {"step": 50}

    store.set_status("a-s0", "completed", summary={"val_loss": float("nan"), "step": 100})
    done = store.run("a-s0")
    assert done["status"] == "completed" and done["ended_at"] is not None
    assert done["summary"]["step"] == 100 and math.isnan(done["summary"]["val_loss"])
    assert done["updated_at"] >= done["created_at"]

    with pytest.raises(KeyError):
        store.set_status("missing", "running")
    with pytest.raises(ValueError):
        store.set_status("a-s0", "finished")


def test_provenance_round_trips(store: Store) -> None:
    prov = {"git_commit": "abc", "gpu_names": ["X"], "path": Path("/tmp/x")}
    store.set_provenance("b-s0", prov)
    assert store.run("b-s0")["provenance"] == {"git_commit": "abc", "gpu_names": ["X"],
                                               "path": "/tmp/x"}
    assert store.run("a-s0")["provenance"] is None
    with pytest.raises(KeyError):
        store.set_provenance("missing", prov)


# -- metrics and events ----------------------------------------------------------------------


def test_metrics_ordered_filtered_and_replaced(store: Store) -> None:
    store.log_many("a-s0", [
        (20, 2048, 2.0, {"train_loss": 4.0, "grad_norm": 1.5}),
        (10, 1024, 1.0, {"train_loss": 5.0, "grad_norm": 2.5}),
    ])
    store.log_metrics("a-s0", 30, 3072, 3.0, {"train_loss": 3.5, "val_loss": 3.9})
    store.log_metrics("b-s0", 10, 1024, 1.1, {"train_loss": 9.0})

    curves = store.metrics("a-s0")
    assert set(curves) == {"train_loss", "grad_norm", "val_loss"}
    assert curves["train_loss"] == [(10, 1024, 1.0, 5.0), (20, 2048, 2.0, 4.0),
                                    (30, 3072, 3.0, 3.5)]
    assert curves["train_loss"][0].tokens == 1024
    assert store.metrics("a-s0", ["val_loss", "never"]) == {"val_loss": [(30, 3072, 3.0, 3.9)]}
    assert store.metrics("a-s0", []) == {}
    assert store.metric_names("a-s0") == ["grad_norm", "train_loss", "val_loss"]
    assert store.last_metric("a-s0", "train_loss") == 3.5
    assert store.last_metric("a-s0", "never") is None

    # Re-logging a step replaces it instead of duplicating it.
    store.log_metrics("a-s0", 20, 2050, 2.5, {"train_loss": 4.1})
    assert store.metrics("a-s0", ["train_loss"])["train_loss"][1] == (20, 2050, 2.5, 4.1)
    assert len(store.metrics("a-s0")["train_loss"]) == 3


def test_non_finite_metric_values_round_trip(store: Store) -> None:
    store.log_metrics("a-s0", 1, 1, 0.1, {"nan": float("nan"), "inf": float("inf"),
                                          "ninf": float("-inf"), "big": 1e308})
    got = {name: rows[0].value for name, rows in store.metrics("a-s0").items()}
    assert math.isnan(got["nan"])
    assert got["inf"] == math.inf and got["ninf"] == -math.inf and got["big"] == 1e308
    assert math.isnan(store.last_metric("a-s0", "nan"))


def test_metrics_of_unknown_run_are_rejected(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.log_metrics("nobody", 1, 1, 0.1, {"loss": 1.0})
    with pytest.raises(sqlite3.IntegrityError):
        store.log_event("nobody", 1, 1, 0.1, "nan", {})


def test_failed_write_commits_nothing(store: Store) -> None:
    store.log_metrics("a-s0", 1, 1, 0.1, {"loss": 1.0})
    # The second step names an unknown run: the whole batch must be rolled back.
    with pytest.raises(sqlite3.IntegrityError), store._write() as conn:
        conn.execute("INSERT INTO metrics VALUES ('a-s0', 2, 2, 0.2, 'loss', 2.0)")
        conn.execute("INSERT INTO metrics VALUES ('nobody', 2, 2, 0.2, 'loss', 2.0)")
    assert store.metrics("a-s0")["loss"] == [(1, 1, 0.1, 1.0)]
    assert not store._conn.in_transaction
    store.log_metrics("a-s0", 3, 3, 0.3, {"loss": 3.0})  # the connection is still usable
    assert store.last_metric("a-s0", "loss") == 3.0


def test_events_filters_and_counts(store: Store) -> None:
    store.log_event("a-s0", 5, 500, 0.5, "spike", {"loss": 9.1, "z": 7.2})
    store.log_event("a-s0", 9, 900, 0.9, "nan", {"where": "loss"})
    store.log_event("a-s0", 7, 700, 0.7, "spike", {"loss": 8.0})
    store.log_event("b-s0", 3, 300, 0.3, "resume", {"from_step": 0})
    eid = store.log_event(None, 0, 0, 0.0, "preflight", {"passed": False})

    spikes = store.events("a-s0", "spike")
    assert [e["step"] for e in spikes] == [5, 7]  # logged order
    assert spikes[0]["detail"] == {"loss": 9.1, "z": 7.2}
    assert set(spikes[0]) == {"id", "run_id", "step", "tokens", "wall_s", "kind", "detail"}
    assert len(store.events()) == 5
    assert [e["run_id"] for e in store.events(kind="preflight")] == [None]
    assert store.events(kind="preflight")[0]["id"] == eid
    assert store.event_counts("a-s0") == {"nan": 1, "spike": 2}
    assert store.event_counts("b-s0") == {"resume": 1}


def test_truncate_after_makes_resume_exact(store: Store) -> None:
    for step in range(0, 101, 10):
        store.log_metrics("a-s0", step, step * 100, step / 10, {"loss": 10 - step / 20})
    store.log_metrics("b-s0", 80, 8000, 8.0, {"loss": 1.0})
    store.log_event("a-s0", 35, 3500, 3.5, "spike", {})
    store.log_event("a-s0", 75, 7500, 7.5, "spike", {})
    store.log_event("b-s0", 90, 9000, 9.0, "spike", {})

    # Killed after step 100, last checkpoint at step 50: rows 60..100 go, then are replayed.
    assert store.truncate_after("a-s0", 50) == (5, 1)
    assert [r.step for r in store.metrics("a-s0")["loss"]] == [0, 10, 20, 30, 40, 50]
    assert [e["step"] for e in store.events("a-s0")] == [35]
    assert store.metrics("b-s0")["loss"] == [(80, 8000, 8.0, 1.0)]
    assert store.event_counts("b-s0") == {"spike": 1}

    store.log_many("a-s0", [(s, s * 100, s / 10 + 1, {"loss": 1.0}) for s in range(60, 101, 10)])
    assert [r.step for r in store.metrics("a-s0")["loss"]] == list(range(0, 101, 10))


# -- results ---------------------------------------------------------------------------------


def test_results_round_trip_and_overwrite(store: Store) -> None:
    assert store.get_result("plan") is None
    assert store.get_result("plan", default={}) == {}
    store.put_result("plan", {"runs": 4, "estimate_s": [1.5, 2.5]})
    store.put_result("spec", {"text": "name: x", "sha256": "ab"})
    store.put_result("plan", {"runs": 6})
    assert store.get_result("plan") == {"runs": 6}
    store.put_result("analysis/val_loss", summarize([1.0]))  # dataclass with NaN fields
    got = store.get_result("analysis/val_loss")
    assert got["n"] == 1 and got["mean"] == 1.0 and math.isnan(got["std"])
    assert store.result_keys() == ["analysis/val_loss", "plan", "spec"]
    assert store.result_keys("analysis/") == ["analysis/val_loss"]
    with pytest.raises(TypeError, match="cannot store"):
        store.put_result("bad", object())
    assert store.get_result("bad") is None


# -- several processes, one file -------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    from lmlab.store import Store
    path, run_id = sys.argv[1], sys.argv[2]
    with Store.open(path) as s:
        s.add_run(run_id, "arm", 0, "{}", "h")
        s.set_status(run_id, "running")
        for i in range(40):
            s.log_many(run_id, [(i * 2 + k, i * 20, float(i), {"loss": 1.0, "lr": 0.1})
                                for k in range(2)])
            if i % 10 == 0:
                s.log_event(run_id, i * 2, i * 20, float(i), "spike", {"i": i})
        s.set_status(run_id, "completed", summary={"n": 80})
""")


def test_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(exp), f"r{i}"],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Store.open(exp) as s:
        assert sorted(r["run_id"] for r in s.runs(status="completed")) == ["r0", "r1", "r2", "r3"]
        for i in range(4):
            curves = s.metrics(f"r{i}")
            assert [r.step for r in curves["loss"]] == list(range(80))
            assert len(curves["lr"]) == 80
            assert s.event_counts(f"r{i}") == {"spike": 4}


# -- provenance ------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo),
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def no_outer_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Keep git from finding a repository above tmp_path.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    return work


def test_capture_reads_git_state(no_outer_repo: Path) -> None:
    repo = no_outer_repo
    _git(repo, "init", "-q", "-b", "exp-branch")
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD")

    prov = capture(repo)
    assert prov["git_commit"] == head and len(head) == 40
    assert prov["git_branch"] == "exp-branch"
    assert prov["git_dirty"] is False
    assert Path(prov["git_root"]).resolve() == repo.resolve()

    (repo / "scratch.txt").write_text("untracked")  # untracked files do not make it dirty
    assert capture(repo / "train.py")["git_dirty"] is False
    (repo / "train.py").write_text("print(2)\n")
    assert capture(repo)["git_dirty"] is True

    _git(repo, "checkout", "-q", "--detach")
    assert capture(repo)["git_branch"] is None


def test_capture_outside_a_repository_or_without_git(no_outer_repo: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prov = capture(no_outer_repo)
    assert {k: prov[k] for k in ("git_commit", "git_branch", "git_dirty", "git_root")} == dict.fromkeys(
        ("git_commit", "git_branch", "git_dirty", "git_root"))
    monkeypatch.setenv("PATH", str(no_outer_repo))  # no git executable to be found
    assert capture(no_outer_repo)["git_commit"] is None


def test_capture_records_versions_and_hardware(no_outer_repo: Path) -> None:
    prov = capture(no_outer_repo)
    json.dumps(prov)  # stored as JSON: must serialise as it is
    captured = datetime.fromisoformat(prov["captured_at"])
    assert captured.utcoffset() is not None and captured.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - captured).total_seconds()) < 60
    assert prov["python_version"] == platform.python_version()
    assert prov["torch_version"] == torch.__version__
    assert prov["numpy_version"] is not None and prov["lmlab_version"] is not None
    assert prov["cpu_count"] == os.cpu_count()
    assert prov["torch_threads"] == torch.get_num_threads()
    assert prov["gpu_count"] == torch.cuda.device_count() == len(prov["gpu_names"])
    assert prov["cuda_version"] == torch.version.cuda
    assert prov["cpu_model"]
    assert prov["hostname"] and prov["os"]
    assert hardware_summary(prov)


def test_hardware_summary() -> None:
    assert hardware_summary({"gpu_names": ["NVIDIA H100 80GB HBM3"], "cpu_count": 16,
                             "cpu_model": "AMD EPYC"}) == "1× NVIDIA H100 80GB HBM3"
    assert hardware_summary({"gpu_names": ["A100", "A100", "T4"]}) == "2× A100, 1× T4"
    # Two cores of one processor are not "2× Xeon" (issue 14): cores are counted as cores.
    assert hardware_summary({"gpu_names": [], "cpu_count": 2, "cpu_count_usable": 2,
                             "cpu_model": "Intel(R) Xeon(R) Processor"}) == (
        "Intel(R) Xeon(R) Processor (CPU, 2 logical cores)")
    assert hardware_summary({"cpu_count": 16, "cpu_count_usable": 4, "cpu_model": "AMD EPYC"}) \
        == "AMD EPYC (CPU, 4 of 16 logical cores usable)"
    assert hardware_summary({"cpu_count": 1, "cpu_model": "x"}) == "x (CPU, 1 logical core)"
    assert hardware_summary({}) == "unknown CPU (CPU)"


def test_a_v2_store_gains_run_roles_and_keeps_every_run_a_confirmation_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v3 adds a run's role (a nuisance sweep's tuning runs beside the confirmation runs): an
    older store's runs all become confirmation runs, and the loader still reads every one."""
    from lmlab.analysis.records import load_runs
    from lmlab.names import Role

    cfg = RunConfig()
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:2])
    with Store.open(tmp_path) as s:
        s.add_run("a-s0", "a", 0, cfg.to_json(), cfg.config_hash)
        assert s.schema_version == 2
        assert "role" not in s.run("a-s0")
    monkeypatch.undo()
    with Store.open(tmp_path) as s:
        assert s.schema_version == LATEST
        assert s.run("a-s0")["role"] == Role.CONFIRMATION and s.run("a-s0")["point"] is None
        s.add_run("a~lr=0.01-s9", "a", 9, cfg.to_json(), cfg.config_hash, role=Role.TUNING,
                  point={"optimizer.lr": 0.01})
        with pytest.raises(ValueError):
            s.add_run("x", "a", 0, cfg.to_json(), cfg.config_hash, role="warmup")
        assert [r.run_id for r in load_runs(s)] == ["a-s0"]
        (tuning,) = load_runs(s, Role.TUNING)
        assert tuning.point == {"optimizer.lr": 0.01} and tuning.role == Role.TUNING
        assert len(load_runs(s, None)) == 2
