"""Stability: loss spikes, divergence, non-finite steps and the memory budget, on real runs.

A non-finite step is recorded before any optimizer step could apply it and ends its run
``diverged``; a run over its memory budget (or out of memory) ends ``over_budget``; all of them
keep their rows, and a sweep goes on to the next run.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import lmlab.train.loop as loop
import lmlab.train.step as step_module
from lmlab.config import DiagnosticsConfig, RunConfig
from lmlab.execute.local import run_sweep
from lmlab.spec.baseline import deep_merge
from lmlab.spec.expand import PlannedRun
from lmlab.store import Store
from lmlab.train.diagnostics import SpikeDetector
from lmlab.train.memory import read_peak, reset_peak

# -- the spike detector on synthetic sequences ----------------------------------------------------


def smooth_curve(n: int = 2000, seed: int = 0) -> list[float]:
    """A loss curve: fast early decay to a slow one, with Gaussian noise."""
    rng = random.Random(seed)
    return [2.0 + 3.0 * math.exp(-t / 40) + 0.5 * math.exp(-t / 800) + rng.gauss(0, 0.02)
            for t in range(n)]


def detect(losses: list[float], detector: SpikeDetector | None = None) -> list[dict]:
    detector = detector or SpikeDetector()
    return [s for step, loss in enumerate(losses, start=1)
            if (s := detector.update(step, loss)) is not None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_smooth_curve_has_no_spikes(seed: int) -> None:
    assert detect(smooth_curve(seed=seed)) == []


def test_inserted_spikes_are_found_at_their_steps_with_their_magnitude() -> None:
    losses = smooth_curve()
    spikes = {300: 0.5, 600: 0.3, 601: 0.4, 1000: 1.0, 1750: 0.25}  # step -> height
    for step, height in spikes.items():
        losses[step - 1] += height
    found = detect(losses)
    assert [s["step"] for s in found] == sorted(spikes)
    for s in found:
        assert s["magnitude"] == pytest.approx(spikes[s["step"]], abs=0.08)
        assert s["z"] > 6 and s["loss"] == losses[s["step"] - 1]


def test_warmup_threshold_and_window_are_honoured() -> None:
    # A flat curve with a bounded deterministic wobble (std 0.014): a bump of 0.07 at a step
    # where the wobble is ~0 is a 5-sigma event.
    losses = [3.0 + 0.02 * math.sin(step) for step in range(1, 401)]
    losses[22 - 1] += 1.0  # step 22: inside a 50-step warm-up
    losses[355 - 1] += 0.07  # step 355 (sin(355) ~ 0): 5 sigma, below the default threshold 6
    assert detect(losses) == []
    assert [s["step"] for s in detect(losses, SpikeDetector(warmup=10))] == [22]
    assert [s["step"] for s in detect(losses, SpikeDetector(threshold=4))] == [355]
    cfg = DiagnosticsConfig(spike_window=7, spike_warmup=3, spike_threshold=2.5)
    d = SpikeDetector.from_config(cfg)
    assert (d.window, d.warmup, d.threshold) == (7, 3, 2.5)
    detect(losses, d)
    assert len(d.history) == 7


def test_non_finite_losses_are_not_spikes_and_do_not_poison_the_window() -> None:
    losses = smooth_curve(600)
    losses[299], losses[300] = math.nan, math.inf
    losses[399] += 0.5
    assert [s["step"] for s in detect(losses)] == [400]


def test_a_lasting_jump_is_a_new_level_after_patience_spikes() -> None:
    losses = smooth_curve(800)
    for i in range(400, 800):
        losses[i] += 1.0
    assert [s["step"] for s in detect(losses)] == [401, 402, 403, 404, 405]


def test_detector_state_survives_a_checkpoint() -> None:
    losses = smooth_curve()
    for step in (300, 1200, 1201):
        losses[step - 1] += 0.5
    whole = detect(losses)
    first = SpikeDetector()
    head = [s for step, loss in enumerate(losses[:1200], start=1)
            if (s := first.update(step, loss)) is not None]
    second = SpikeDetector()
    second.load_state_dict(first.state_dict())
    tail = [s for step, loss in enumerate(losses[1200:], start=1201)
            if (s := second.update(step, loss)) is not None]
    assert head + tail == whole and [s["step"] for s in whole] == [300, 1200, 1201]


# -- real runs ------------------------------------------------------------------------------------


def run_cfg(data: dict, **sections: dict) -> RunConfig:
    tree: dict = {
        "data": data,
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
        "optimizer": {"lr": 1e-2},
        "schedule": {"name": "constant"},
        "train": {"batch_size": 8, "seq_len": 32, "device": "cpu"},
        "budget": {"steps": 40},
        "evaluation": {"every_steps": 100, "max_batches": 1, "batch_size": 8,
                       "test_at_end": False,
                       "diagnostics": {"every_steps": 1000, "spike_window": 10,
                                       "spike_warmup": 10, "spike_threshold": 6.0}},
        "cadence": {"log_every_steps": 5},
    }
    return RunConfig.model_validate(deep_merge(tree, sections))


def start(cfg: RunConfig, tmp: Path, run_id: str = "r") -> Store:
    store = Store.open(tmp)
    store.add_run(run_id, "arm", cfg.train.seed, cfg.to_json(), cfg.config_hash)
    return store


def poison_batches(monkeypatch: pytest.MonkeyPatch, steps: set[int] | None = None,
                   from_step: int | None = None, batch_size: int = 8) -> None:
    """Replace the training batches of the given (0-based) steps by uniformly random bytes: text
    a model of WikiText has learnt to find very unlikely, so their loss jumps."""

    class Poisoned(loop.TrainBatcher):
        def batch(self, start: int, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = super().batch(start, n, seq_len)
            step = start // batch_size
            if (steps and step in steps) or (from_step is not None and step >= from_step):
                w = torch.randint(0, 256, (n, seq_len + 1),
                                  generator=torch.Generator().manual_seed(step))
                return w[:, :-1], w[:, 1:]
            return x, y

    monkeypatch.setattr(loop, "TrainBatcher", Poisoned)


def test_a_real_loss_spike_is_an_event_and_a_clean_run_has_none(
        articles_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = run_cfg(articles_data)
    clean = start(cfg, tmp_path / "clean")
    assert loop.train(cfg, "r", clean, tmp_path / "clean" / "run").status == "completed"
    assert clean.events("r", "spike") == []

    poison_batches(monkeypatch, steps={25})  # the 26th step
    store = start(cfg, tmp_path / "spiky")
    result = loop.train(cfg, "r", store, tmp_path / "spiky" / "run")
    assert result.status == "completed"  # a spike is an event, not a stop
    (spike,) = store.events("r", "spike")
    assert spike["step"] == 26 and spike["tokens"] == 26 * 8 * 32
    loss = {r.step: r for r in store.metrics("r", ["train_loss"])["train_loss"]}
    assert spike["wall_s"] == loss[26].wall_s
    assert spike["detail"]["loss"] == loss[26].value
    assert spike["detail"]["magnitude"] > 1.0 and spike["detail"]["z"] > 6
    assert len(loss) == 40


def test_loss_above_the_divergence_factor_stops_the_run(
        articles_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_batches(monkeypatch, from_step=20)
    cfg = run_cfg(articles_data, evaluation={"diagnostics": {"divergence_factor": 1.1}})
    store = start(cfg, tmp_path)
    result = loop.train(cfg, "r", store, tmp_path / "run")
    assert result.status == "diverged" and store.run("r")["status"] == "diverged"
    (event,) = store.events("r", "divergence")
    early = store.metrics("r", ["train_loss"])["train_loss"]
    first_interval = sum(r.value for r in early[:5]) / 5
    assert event["step"] == 25  # the first log interval with poisoned steps (21-25)
    assert event["detail"]["early_loss"] == pytest.approx(first_interval)
    assert event["detail"]["loss"] > 1.1 * first_interval and event["detail"]["factor"] == 1.1
    assert [r.step for r in early] == list(range(1, 26))  # every row kept, none after


class _Recorder:
    """Every optimizer step applied (with the parameters right after it) and every store write,
    in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple] = []
        self.after_step: list[list[torch.Tensor]] = []
        self.optimizer: torch.optim.Optimizer | None = None

        def post(optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
            self.optimizer = optimizer
            self.after_step.append([p.detach().clone() for p in self.params()])
            self.log.append(("step", len(self.after_step)))

        self.handle = register_optimizer_step_post_hook(post)
        log_event, log_many = Store.log_event, Store.log_many

        def event(store: Store, run_id: str | None, step: int, *a: object, **k: object) -> int:
            self.log.append(("event", a[2] if len(a) > 2 else k.get("kind"), step))
            return log_event(store, run_id, step, *a, **k)

        def many(store: Store, run_id: str, rows: list) -> None:
            rows = list(rows)
            for step, _t, _w, values in rows:
                if "train_loss" in values:
                    self.log.append(("train_loss", step, values["train_loss"]))
            log_many(store, run_id, rows)

        monkeypatch.setattr(Store, "log_event", event)
        monkeypatch.setattr(Store, "log_many", many)

    def params(self) -> list[torch.Tensor]:
        assert self.optimizer is not None
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def test_a_non_finite_step_is_recorded_before_any_optimizer_step_applies_it(
        articles_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = run_cfg(articles_data, optimizer={"lr": 1e6}, cadence={"log_every_steps": 4})
    store = start(cfg, tmp_path)
    rec = _Recorder(monkeypatch)
    try:
        result = loop.train(cfg, "r", store, tmp_path / "run")
    finally:
        rec.handle.remove()

    assert result.status == "diverged" and store.run("r")["status"] == "diverged"
    (event,) = store.events("r", "nan")
    bad = event["step"]
    assert bad >= 2 and event["tokens"] == bad * 8 * 32
    assert not (math.isfinite(event["detail"]["loss"]) and math.isfinite(event["detail"]["grad_norm"]))
    # Exactly the steps before the bad one were applied, and the event came first: no optimizer
    # step and no metric row of the bad step was written before it.
    assert len(rec.after_step) == bad - 1 == result.summary["steps"]
    i = rec.log.index(("event", "nan", bad))
    assert ("step", bad - 1) in rec.log[:i] and ("step", bad) not in rec.log
    assert not any(e[0] == "train_loss" and e[1] == bad for e in rec.log[:i])
    # The weights are exactly those after the last good step, and finite.
    for live, saved in zip(rec.params(), rec.after_step[-1], strict=True):
        assert torch.equal(live.detach(), saved) and torch.isfinite(saved).all()
    # Every row is kept, the bad step's included (non-finite, as it was).
    loss = store.metrics("r", ["train_loss", "grad_norm"])
    assert [r.step for r in loss["train_loss"]] == list(range(1, bad + 1))
    assert all(math.isfinite(r.value) for r in loss["train_loss"][:-1])
    last = (loss["train_loss"][-1].value, loss["grad_norm"][-1].value)
    assert not all(math.isfinite(v) for v in last)
    assert "non-finite" in store.run("r")["summary"]["reason"]


def test_out_of_memory_ends_the_run_over_budget_with_its_rows(
        articles_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error (CUDA's, simulated here in the 7th training forward) is caught:
    the run is over_budget with an oom event, the six steps before it keep their rows."""
    build = step_module.build_model

    def build_failing(*args: object, **kwargs: object) -> torch.nn.Module:
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module: torch.nn.Module, _inp: object) -> None:
            if module.training:
                calls["n"] += 1
                if calls["n"] == 7:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        # On the first block: training calls the model's body (``GPT.hidden``; the head is fused
        # with the loss), not its ``__call__``.
        model.blocks[0].register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(step_module, "build_model", build_failing)
    cfg = run_cfg(articles_data, budget={"steps": 12}, cadence={"log_every_steps": 4})
    store = start(cfg, tmp_path)
    result = loop.train(cfg, "r", store, tmp_path / "run")
    assert result.status == "over_budget" and store.run("r")["status"] == "over_budget"
    (event,) = store.events("r", "oom")
    assert event["step"] == 6 and "out of memory" in event["detail"]["error"]
    assert event["detail"]["peak_mem_bytes"] > 0
    assert [r.step for r in store.metrics("r", ["train_loss"])["train_loss"]] == list(range(1, 7))


def test_peak_memory_is_reset_per_run() -> None:
    cpu = torch.device("cpu")
    reset_peak(cpu)
    base = read_peak(cpu).peak_bytes
    block = torch.ones(96 * 2**20 // 4)  # 96 MiB, written (resident)
    high = read_peak(cpu).peak_bytes
    assert high >= base + 90 * 2**20
    del block
    reset_peak(cpu)
    if read_peak(cpu).peak_bytes >= high:
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    assert read_peak(cpu).peak_bytes < high - 60 * 2**20


# -- a sweep goes on ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict]:
    """Three runs in one sweep, each in its own process: lr = 1e6 (non-finite by step 2), a
    1 MiB memory budget (a Python process alone is far above it), and a healthy run last."""
    data = {"dataset": "local", "path": str(data_dir / "wikitext-2-test-articles"),
            "name": "wikitext-2-test-articles"}
    configs = {
        "nan": run_cfg(data, optimizer={"lr": 1e6}, budget={"steps": 20}),
        "mem": run_cfg(data, budget={"steps": 20, "max_memory_mb": 1}),
        "ok": run_cfg(data, budget={"steps": 20, "max_memory_mb": 100_000}),
    }
    runs = [PlannedRun(run_id=name, arm=name, seed=0, config=cfg, values={})
            for name, cfg in configs.items()]
    out = tmp_path_factory.mktemp("sweep")
    statuses = run_sweep(runs, out)
    return Store(out), statuses


def test_sweep_marks_each_run_and_goes_on(sweep: tuple[Store, dict]) -> None:
    store, statuses = sweep
    assert statuses == {"nan": "diverged", "mem": "over_budget", "ok": "completed"}
    assert {r["run_id"]: r["status"] for r in store.runs()} == statuses
    ok = store.metrics("ok", ["train_loss"])["train_loss"]
    assert [r.step for r in ok] == list(range(1, 21))
    assert store.events("ok") == []


def test_sweep_diverged_run_keeps_its_rows_and_event(sweep: tuple[Store, dict]) -> None:
    store, _ = sweep
    (event,) = store.events("nan", "nan")
    loss = store.metrics("nan", ["train_loss"])["train_loss"]
    assert [r.step for r in loss] == list(range(1, event["step"] + 1))
    assert store.run("nan")["summary"]["steps"] == event["step"] - 1


def test_sweep_over_budget_run_records_the_figure(sweep: tuple[Store, dict]) -> None:
    store, _ = sweep
    (event,) = store.events("mem", "over_budget")
    peak = event["detail"]["peak_mem_bytes"]
    assert event["detail"]["max_memory_mb"] == 1 and peak > 2**20
    assert event["detail"]["peak_mem_kind"] == "rss"
    assert event["step"] == 5  # the first memory check: the end of the first log interval
    rows = store.metrics("mem", ["train_loss", "peak_mem_bytes"])
    assert [r.step for r in rows["train_loss"]] == [1, 2, 3, 4, 5]  # stopped there, rows kept
    assert rows["peak_mem_bytes"][-1].value == peak
    summary = store.run("mem")["summary"]
    assert summary["peak_mem_bytes"] >= peak and "memory" in summary["reason"]
