"""The report, built from synthetic stores written row by row (fast and exact): the template's
headings in order, numbers that equal a recomputation from the store, verdicts that respect the
statistics, escaping, a self-contained HTML file that a real browser renders, and compare."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmlab.analysis.curves import arm_curves
from lmlab.analysis.stats import paired, summarize
from lmlab.analysis.summary import load_experiment, summarize_arms
from lmlab.config import RunConfig
from lmlab.report import compare, write_report
from lmlab.spec.schema import Spec
from lmlab.store import Store

TEMPLATE = Path(os.environ.get("LMLAB_DATA_DIR", "/nonexistent")).parent / "mission" / \
    "experiment_template.txt"


# -- a synthetic experiment, written the way the executor writes one ------------------------------


@dataclass
class Arm:
    name: str
    values: dict[str, Any]
    finals: list[float]  # final validation loss, one per seed
    tokens_per_s: float = 20_000.0
    peak_mem: float = 300 * 2**20
    diverge_at: dict[int, int] = field(default_factory=dict)  # seed index -> step
    spikes: dict[int, list[int]] = field(default_factory=dict)  # seed index -> steps
    failed: set[int] = field(default_factory=set)  # seed indices that crashed before starting


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def build_experiment(directory: Path, arms: Sequence[Arm], *, checks: Sequence[Mapping] = (),
                     name: str = "lr-sweep", category: str = "hyperparam",
                     axis: str = "equal_tokens", cuda: bool = False, steps: int = 60,
                     objective: str = "Does a larger learning rate reach a lower loss?",
                     preflight: bool | str = True, addendum: bool = False,
                     is_wikitext2: bool = True, corpus: str = "wikitext-2-raw-v1",
                     vocab: int = 8192, store_spec: bool = True,
                     prediction: str = "The high-lr arm ends with a lower validation loss.",
                     expected: Sequence[object] = ("high lr converges faster",
                                                   "low lr is under-trained")) -> Path:
    n_seeds = len(arms[0].finals)
    seeds = list(range(n_seeds))
    variables = sorted({k for a in arms for k in a.values})
    batch, seq_len = 8, 256
    tokens_per_step = batch * seq_len
    spec_doc = {
        "meta": {"name": name, "category": category, "seeds": seeds},
        "objective": objective,
        "hypothesis": {"mechanism": "Larger steps escape the plateau sooner.",
                       "prediction": prediction,
                       "falsification": "The high-lr arm is no better, or diverges.",
                       "checks": list(checks)},
        "controlled": {"train": {"batch_size": batch, "seq_len": seq_len}},
        "independent": {"variables": variables, "arms": {a.name: a.values for a in arms}},
        "budget": {"tokens": steps * tokens_per_step, "max_memory_mb": 4096},
        "comparison_axis": axis,
        "expected_outcomes": list(expected),
        "systems_addendum": addendum,
    }
    spec = Spec.model_validate(spec_doc)
    plan_runs = []
    with Store.open(directory) as store:
        if store_spec:
            store.put_result("experiment/spec", {"path": "spec.yaml", "text": json.dumps(spec_doc),
                                                 "hash": "abc", "spec": spec.model_dump(mode="json")})
        rng = np.random.default_rng(0)
        for arm in arms:
            for i, seed in enumerate(seeds):
                cfg = RunConfig().model_dump(mode="json")
                _set(cfg, "train.batch_size", batch)
                _set(cfg, "train.seq_len", seq_len)
                _set(cfg, "budget.tokens", steps * tokens_per_step)
                _set(cfg, "budget.steps", None)
                for path, value in arm.values.items():
                    _set(cfg, path, value)
                _set(cfg, "train.seed", seed)
                run_cfg = RunConfig.model_validate(cfg)
                run_id = f"{arm.name}-s{seed}"
                plan_runs.append({"run_id": run_id, "arm": arm.name, "seed": seed,
                                  "values": arm.values, "tokens": steps * tokens_per_step,
                                  "steps": steps, "wall_clock_s": None, "effective_batch": batch,
                                  "tokens_per_step": tokens_per_step, "estimate_s": 30.0})
                store.add_run(run_id, arm.name, seed, run_cfg.to_json(), run_cfg.config_hash)
                _write_run(store, run_id, arm, i, steps, tokens_per_step, rng, cuda, corpus,
                           is_wikitext2, vocab)
        store.put_result("experiment/plan", {
            "axis": axis, "reference": arms[0].name, "variables": variables, "runs": plan_runs,
            "estimate_total_s": 30.0 * len(plan_runs)})
        if preflight:
            ok = preflight is True
            store.put_result("experiment/preflight", {"passed": ok, "configs": [{
                "key": "cfg0", "arms": [a.name for a in arms], "passed": ok, "initial_loss": 9.1,
                "final_loss": 0.2 if ok else 2.4, "threshold": 0.5, "steps": 150,
                "batch_size": 4, "sequences": 4, "seq_len": seq_len, "nan": False,
                "grads_finite": True,
                "losses": list(np.geomspace(9.1, 0.2 if ok else 2.4, 150))}]})
    return directory


def _write_run(store: Store, run_id: str, arm: Arm, i: int, steps: int, tps: int,
               rng: np.random.Generator, cuda: bool, corpus: str, is_wt2: bool,
               vocab: int) -> None:
    final = arm.finals[i]
    step_s = tps / arm.tokens_per_s
    stop = arm.diverge_at.get(i)
    last = stop if stop is not None else steps
    store.set_provenance(run_id, {
        "captured_at": "2025-03-04T10:00:00+00:00", "git_commit": "0123456789abcdef" * 2 + "01234567",
        "git_branch": "main", "git_dirty": False, "python_version": "3.11.2",
        "torch_version": "2.13.0", "lmlab_version": "0.1.0", "cpu_model": "Test CPU",
        "cpu_count": 2, "gpu_names": ["NVIDIA H100 80GB HBM3"] if cuda else [],
        "gpu_count": 1 if cuda else 0, "hostname": "test", "corpus": corpus,
        "is_wikitext2": is_wt2, "data_hash": "d" * 16, "tokenizer_hash": f"t{vocab}",
        "vocab_size": vocab, "device": "cuda:0" if cuda else "cpu"})
    store.set_status(run_id, "running")
    if i in arm.failed:
        store.set_status(run_id, "failed", error="Traceback ...\nRuntimeError: CUDA error: boom")
        return
    tau = steps / 4

    def val_at(s: int) -> float:
        # Ends exactly at `final` at the end of the budget.
        return final + (9.0 - final) * (math.exp(-s / tau) - math.exp(-steps / tau))

    rows = []
    for s in range(1, last + 1):
        loss = val_at(s) + 0.05 + float(rng.normal(0, 0.02))
        if stop is not None and s >= stop - 2:
            loss = 30.0 * (s - stop + 3)
        values = {"train_loss": loss, "grad_norm": 1.0 + float(rng.random()) * 0.3,
                  "lr": 1e-3}
        if s % 10 == 0 or s == last:
            values.update({"step_time_s": step_s * (1 + 0.01 * float(rng.random())),
                           "tokens_per_s": arm.tokens_per_s, "peak_mem_bytes": arm.peak_mem})
        if s % 20 == 0:
            for b in (0, 1, 3):
                values[f"act_rms/block.{b}"] = 1.0 + 0.1 * b + s / steps
            for b in range(4):
                values[f"grad_norm/block.{b}"] = 0.3 + 0.05 * b
                values[f"update_ratio/block.{b}"] = 1e-3 * (1 + b)
                values[f"attn_entropy/layer.{b}"] = 2.0 - 0.2 * b + 0.01 * i
                values[f"norm_grad_norm/blocks.{b}.ln_1.weight"] = 0.01 * (b + 1)
                values[f"norm_grad_norm/blocks.{b}.ln_1.bias"] = 0.005 * (b + 1)
        rows.append((s, s * tps, s * step_s, values))
    for s in range(0, last + 1, 10):
        v = val_at(s)
        rows.append((s, s * tps, s * step_s, {"val_loss": v, "val_ppl": math.exp(v),
                                              "val_bpb": v * 0.36, "val_word_ppl": math.exp(1.3 * v)}))
    # log_many merges rows by (name, step); ordering within the list does not matter.
    merged: dict[int, tuple[int, int, float, dict[str, float]]] = {}
    for s, t, w, vals in rows:
        merged.setdefault(s, (s, t, w, {}))[3].update(vals)
    store.log_many(run_id, sorted(merged.values()))
    for s in arm.spikes.get(i, []):
        store.log_event(run_id, s, s * tps, s * step_s, "spike",
                        {"loss": val_at(s) + 1.5, "mean": val_at(s), "std": 0.1, "z": 15.0,
                         "magnitude": 1.5})
    summary: dict[str, Any] = {
        "steps": last, "tokens": last * tps, "train_s": last * step_s, "wall_s": last * step_s + 3,
        "tokens_per_s": arm.tokens_per_s, "peak_mem_bytes": arm.peak_mem,
        "peak_mem_kind": "cuda_allocated" if cuda else "rss",
        "peak_mem_reserved_bytes": arm.peak_mem * 1.2 if cuda else None, "n_params": 3_400_000,
        "optimizer_state_bytes": 27_000_000, "optimizer_impl": "foreach"}
    last_eval = (last // 10) * 10
    v = val_at(last_eval)
    summary.update({"final_val_loss": v, "final_val_ppl": math.exp(v), "final_val_bpb": v * 0.36,
                    "final_val_word_ppl": math.exp(1.3 * v)})
    if stop is not None:
        store.log_event(run_id, stop, stop * tps, stop * step_s, "divergence",
                        {"loss": 90.0, "early_loss": 9.0, "factor": 3.0})
        summary["reason"] = "loss above divergence_factor x early loss"
        store.set_status(run_id, "diverged", summary=summary)
        return
    test = final + 0.02
    store.log_metrics(run_id, last, last * tps, last * step_s, {
        "test_loss": test, "test_ppl": math.exp(test), "test_bpb": test * 0.36,
        "test_word_ppl": math.exp(1.3 * test)})
    summary.update({"test_loss": test, "test_ppl": math.exp(test), "test_bpb": test * 0.36,
                    "test_word_ppl": math.exp(1.3 * test)})
    store.set_status(run_id, "completed", summary=summary)


CLEAR_WIN = [
    Arm("lr1e-3", {"optimizer.lr": 1e-3}, [5.10, 5.12, 5.11], 21_000, 310 * 2**20),
    Arm("lr3e-3", {"optimizer.lr": 3e-3}, [4.80, 4.81, 4.79], 20_500, 312 * 2**20),
]
WIN_CHECK = {"metric": "final_val_loss", "arm": "lr3e-3", "op": "<", "than": "lr1e-3"}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A three-arm CUDA experiment with a clear win, a spike, a diverged seed, preflight and the
    systems addendum: every section has something to say."""
    d = tmp_path_factory.mktemp("full")
    arms = [*CLEAR_WIN, Arm("lr1e-2", {"optimizer.lr": 1e-2}, [4.95, 5.30, 5.00], 20_000,
                            315 * 2**20, diverge_at={1: 34}, spikes={0: [25]})]
    build_experiment(d, arms, checks=[WIN_CHECK, {"metric": "divergence_events", "arm": "lr3e-3",
                                                  "op": "==", "value": 0}],
                     cuda=True, addendum=True)
    return d, write_report(d)


# -- helpers ---------------------------------------------------------------------------------


def template_headings() -> list[str]:
    """The template's section and sub-section headings, in order. Section headings are numbered
    or stand after two blank lines; sub-headings are short title lines between blank lines
    (no sentence punctuation, no glued table header like "VariableValues")."""
    if not TEMPLATE.is_file():
        pytest.skip(f"experiment template not found at {TEMPLATE} (set LMLAB_DATA_DIR)")
    lines = TEMPLATE.read_text(encoding="utf-8").splitlines()
    out = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        before = lines[i - 1].strip() if i else ""
        after = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if not line or line.startswith("•"):
            continue
        numbered = re.match(r"^\d+\. \S", line)
        titled = (before == "" and after == "" and re.fullmatch(r"[A-Z][A-Za-z /()-]*", line)
                  and not re.search(r"[a-z][A-Z]", line))
        if numbered or titled:
            out.append(line)
    return out


def md_headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,4}) (.+)$", text, re.MULTILINE)]


class _Headings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self._in = False
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h1", "h2", "h3", "h4"):
            self._in = True
            self.headings.append("")
        for key, value in attrs:
            if key in ("src", "href"):
                self.srcs.append(value or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3", "h4"):
            self._in = False

    def handle_data(self, data: str) -> None:
        if self._in:
            self.headings[-1] += data


def is_subsequence(needles: Sequence[str], haystack: Sequence[str]) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


def md_table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| " + header_start):
            headers = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])]
                rows.append(dict(zip(headers, cells, strict=True)))
            return rows
    raise AssertionError(f"no table starting with {header_start!r}")


def parse_pm(cell: str) -> tuple[float, float | None, int]:
    m = re.fullmatch(r"([\d,.]+)(?: ± ([\d,.]+))?(?: MiB)? \(n=(\d+)\)", cell)
    assert m, f"not a 'mean ± std (n=k)' cell: {cell!r}"
    std = float(m.group(2).replace(",", "")) if m.group(2) else None
    return float(m.group(1).replace(",", "")), std, int(m.group(3))


# -- tests -----------------------------------------------------------------------------------


def test_every_template_heading_in_order(full_report: tuple[Path, Any]) -> None:
    _, paths = full_report
    expected = template_headings()
    # The parse itself must find the template's structure, or this test proves nothing.
    assert expected[0] == "0. Experiment Meta" and "11. Follow-up Questions" in expected
    assert "Overfit Sanity Template (Quick Preflight)" in expected
    assert {"Budget", "Raw Observations", "Quantitative Summary", "Pass Criteria",
            "Memory / Systems Experiment Addendum"} <= set(expected)
    md = paths.markdown.read_text(encoding="utf-8")
    assert is_subsequence(expected, md_headings(md)), (expected, md_headings(md))
    parser = _Headings()
    parser.feed(paths.html.read_text(encoding="utf-8"))
    assert is_subsequence(expected, [h.strip() for h in parser.headings])
    # The template's labels appear with their values filled in, never left blank.
    for label in ("Experiment Name", "Category", "Date", "Commit Hash / Branch", "Seed(s)",
                  "Selected LR", "Selected batch size", "Selected optimizer",
                  "Any architectural preference", "Dataset Slice", "Batch Size", "Steps Run",
                  "Memory saved", "Speed change", "Any training behavior difference"):
        m = re.search(rf"\*\*{re.escape(label)}:\*\* (\S.*)", md)
        assert m, label
    assert "Category:** Hyperparam" in md
    assert "**Commit Hash / Branch:** 0123456789ab / main" in md
    assert "☑ Equal tokens seen" in md and "☐ Equal optimizer steps" in md
    assert "WikiText-2 (wikitext-2-raw-v1)" in md


def test_quantitative_summary_equals_the_store(full_report: tuple[Path, Any]) -> None:
    d, paths = full_report
    md = paths.markdown.read_text(encoding="utf-8")
    rows = md_table(md, "Config")
    assert [r["Config"] for r in rows] == ["lr1e-3", "lr3e-3", "lr1e-2"]
    assert "Peak VRAM" in rows[0]  # CUDA provenance: the template's own label
    columns = {"Final Val Loss": ("final_val_loss", 4, 1.0), "Final PPL": ("final_val_ppl", 2, 1.0),
               "Bits/byte": ("final_val_bpb", 4, 1.0), "Word PPL": ("final_val_word_ppl", 2, 1.0),
               "Tokens/sec": ("tokens_per_s", 0, 1.0), "Peak VRAM": ("peak_mem_bytes", 1, 2**-20)}
    with Store(d) as store:
        runs = store.runs()
        last_val = {r["run_id"]: {k: store.last_metric(r["run_id"], f"val_{k}")
                                  for k in ("loss", "ppl", "bpb", "word_ppl")} for r in runs}

    def raw(r: dict, key: str) -> float:
        """One run's number, recomputed from the store as the records define it."""
        if key.startswith("final_val_"):
            return last_val[r["run_id"]][key.removeprefix("final_val_")]
        if key == "tokens_per_s":  # training tokens / training seconds, the whole run
            return r["summary"]["tokens"] / r["summary"]["train_s"]
        return r["summary"][key]

    for row in rows:
        mine = [r for r in runs if r["arm"] == row["Config"]]
        for col, (key, decimals, scale) in columns.items():
            # Completed runs only for end-of-run metrics, diverged runs too for speed and memory.
            keep = [r for r in mine if r["status"] == "completed"
                    or (r["status"] == "diverged" and not key.startswith("final_"))]
            vals = [raw(r, key) * scale for r in keep]
            mean, std, n = parse_pm(row[col])
            tol = 0.5 * 10**-decimals + 1e-9
            assert n == len(vals), (row["Config"], col)
            assert mean == pytest.approx(float(np.mean(vals)), abs=tol), (row["Config"], col)
            if n > 1:
                assert std == pytest.approx(float(np.std(vals, ddof=1)), abs=tol)
    # The diverged seed of lr1e-2 is out of the loss columns and named in the notes.
    lr2 = rows[2]
    assert parse_pm(lr2["Final Val Loss"])[2] == 2 and "1 diverged" in lr2["Notes"]
    # summary.csv holds the same numbers at full precision.
    with paths.csv.open() as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    for arm, finals in (("lr1e-3", [5.10, 5.12, 5.11]), ("lr3e-3", [4.80, 4.81, 4.79])):
        s = summarize(finals)
        assert float(table[arm]["final_val_loss_mean"]) == pytest.approx(s.mean, abs=1e-12)
        assert float(table[arm]["final_val_loss_std"]) == pytest.approx(s.std, abs=1e-12)
        assert table[arm]["completed"] == "3"
    assert table["lr1e-2"]["diverged"] == "1" and table["lr1e-2"]["n"] == "2"


def test_clear_win_is_supported_with_its_interval(full_report: tuple[Path, Any]) -> None:
    _, paths = full_report
    md = paths.markdown.read_text(encoding="utf-8")
    checks = md_table(md, "Check")
    win = next(r for r in checks if r["Check"].startswith("final_val_loss: lr3e-3 < lr1e-3"))
    assert win["Verdict"] == "SUPPORTED"
    m = re.match(r"([-+][\d.]+) \[([-+][\d.]+), ([-+][\d.]+)\]", win["Difference (95% CI)"])
    assert m, win
    diff, lo, hi = map(float, m.groups())
    assert diff == pytest.approx(4.80 - 5.11, abs=1e-3) and lo < diff < hi < 0
    # Every arm ran seeds 0-2 under the default (shared) seed policy: analysed seed by seed.
    assert "paired t-test (3 seed pairs" in win["Test"] and "p = " in win["Test"]
    assert win["Analysis"] == "paired (3 seed pairs)"
    ref = paired(list(enumerate([4.80, 4.81, 4.79])), list(enumerate([5.10, 5.12, 5.11])))
    assert (lo, hi) == (pytest.approx(ref.ci_low, abs=1e-3), pytest.approx(ref.ci_high, abs=1e-3))
    # The per-seed differences are shown, seed by seed.
    diffs = [r for r in md_table(md, "Check | Seed") if r["Check"] == win["Check"]]
    assert [r["Seed"] for r in diffs] == ["0", "1", "2", "mean (sd)"]
    assert float(diffs[0]["Difference"]) == pytest.approx(4.80 - 5.10, abs=1e-3)
    # 0 divergences in every seed of lr3e-3: an exact per-seed check.
    div = next(r for r in checks if r["Check"].startswith("divergence_events"))
    assert div["Verdict"] == "SUPPORTED" and "per-seed" in div["Test"]
    assert "Hypothesis verdict: **SUPPORTED**" in md
    # lr3e-3 beats lr1e-3, but lr1e-2 (4.95 and 5.00 over its two completed seeds) is not
    # separated from it: the decision names no lr, and says why.
    assert "- **Selected LR:** none shown (provisional): optimizer.lr = 0.003 has the best mean " \
           "but ties within noise with optimizer.lr = 0.01 (lr1e-2" in md
    assert "NOT separated: a tie within noise" in md
    assert "n/a (not varied" in md  # batch size, optimizer, architecture were not varied


def test_observations_come_from_the_data(full_report: tuple[Path, Any]) -> None:
    _, paths = full_report
    md = paths.markdown.read_text(encoding="utf-8")
    obs = md.split("### Raw Observations")[1].split("### Quantitative Summary")[0]
    assert "lr1e-2-s1 diverged at step 34" in obs
    assert "lr1e-2: 1 loss spike in 1 of 3 seeds" in obs and "step 25 of seed 0" in obs
    # lr1e-3's seeds agree (std 0.01) but the diverged arm's survivors (4.95, 5.00) sit close
    # to lr3e-3 relative to... nothing else; no spurious "seeds disagree" for the clear arms.
    assert "lr3e-3: its seeds disagree" not in obs
    follow = md.split("## 11. Follow-up Questions")[1]
    assert "lr1e-2 diverged in 1 of 3 seeds" in follow and "lower learning rate" in follow
    # The best lr (3e-3) is inside the swept range (1e-3..1e-2): no edge-of-range advice.
    assert "extend the sweep" not in follow
    assert "☑ Pass" in md.split("## Overfit Sanity Template")[1]


def test_a_a_experiment_is_never_supported(tmp_path: Path) -> None:
    """Two identical arms (the same config and seeds, so identical numbers, as deterministic
    training gives) and a directional check in each direction: neither may be supported."""
    finals = [5.02, 4.97, 5.05, 4.99, 5.01]
    arms = [Arm("a", {"optimizer.lr": 1e-3}, finals), Arm("b", {"optimizer.lr": 1e-3}, finals)]
    build_experiment(tmp_path, arms, checks=[
        {"metric": "final_val_loss", "arm": "a", "op": "<", "than": "b"},
        {"metric": "final_val_loss", "arm": "a", "op": ">", "than": "b"},
        {"metric": "final_val_loss", "arm": "a", "op": "equivalent", "than": "b", "margin": 0.2}])
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    rows = md_table(md, "Check")
    assert [r["Verdict"] for r in rows] == ["INCONCLUSIVE", "INCONCLUSIVE", "SUPPORTED"]
    assert "Hypothesis verdict: **INCONCLUSIVE**" in md
    assert "(provisional)" in md


def test_n_equal_one_is_too_small_for_a_test(tmp_path: Path) -> None:
    arms = [Arm("lr1e-3", {"optimizer.lr": 1e-3}, [5.1]),
            Arm("lr3e-3", {"optimizer.lr": 3e-3}, [4.2])]
    build_experiment(tmp_path, arms, checks=[WIN_CHECK])
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    row = md_table(md, "Check")[0]
    assert row["Verdict"] == "INCONCLUSIVE"
    assert "n too small for a test" in row["Test"] and "p = " not in row["Test"]
    summary = md_table(md, "Config")
    assert summary[0]["Final Val Loss"] == "5.1000 (n=1)"  # no ± with one seed
    assert "Only one seed in lr1e-3, lr3e-3" in md


def test_cpu_memory_column_and_non_wikitext_corpus(tmp_path: Path) -> None:
    build_experiment(tmp_path, CLEAR_WIN, checks=[WIN_CHECK], cuda=False, corpus="my-notes",
                     is_wikitext2=False, preflight=False, axis="equal_wall_clock")
    paths = write_report(tmp_path)
    md = paths.markdown.read_text(encoding="utf-8")
    assert "Peak memory (RSS)" in md_table(md, "Config")[0]
    assert "Peak VRAM |" not in md
    assert "my-notes (not WikiText-2)" in md and "WikiText-2 (wikitext-2-raw-v1)" not in md
    assert "☑ Equal wall-clock time" in md
    assert "Preflight not run or skipped" in md
    assert "## Memory / Systems Experiment Addendum" not in md
    # Equal wall-clock: a second loss figure against training seconds.
    assert (tmp_path / "report_files" / "loss_wall_s.png").is_file()


def test_spec_text_is_escaped(tmp_path: Path) -> None:
    evil = "Does <script>alert('x')</script> & <img src=x onerror=alert(1)> matter?\n# not a heading"
    build_experiment(tmp_path, CLEAR_WIN, objective=evil)
    paths = write_report(tmp_path)
    html = paths.html.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;img" in html
    md = paths.markdown.read_text(encoding="utf-8")
    # Inside a fenced code block (the spec as written) text is inert; everywhere else a tag
    # must be defused.
    fences = re.findall(r"^(`{3,})yaml\n.*?^\1$", md, re.MULTILINE | re.DOTALL)
    assert fences, "the spec as written is missing"
    prose = re.sub(r"^(`{3,})yaml\n.*?^\1$", "", md, flags=re.MULTILINE | re.DOTALL)
    assert "<script>" not in prose and "&lt;script>" in prose
    assert "\\# not a heading" in prose and "# not a heading" not in md_headings(md)


def test_html_is_self_contained(full_report: tuple[Path, Any]) -> None:
    _, paths = full_report
    html = paths.html.read_text(encoding="utf-8")
    # Outside the embedded images (base64 may contain "//"), no URL of any kind: no scheme,
    # no protocol-relative reference.
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http:" not in text and "https:" not in text and "//" not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    parser = _Headings()
    parser.feed(html)
    assert parser.srcs, "no images or links found"
    for ref in parser.srcs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:80]
    images = [s for s in parser.srcs if s.startswith("data:")]
    assert len(images) >= 5  # loss, grad norm, speed/memory, diagnostics, preflight
    for png in paths.figures:
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The Markdown links its figures relatively, and they exist.
    md = paths.markdown.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all(not Path(link).is_absolute() for link in links)
    assert all((paths.markdown.parent / link).is_file() for link in links)


class _Toc(HTMLParser):
    """The ids of the h2 headings and the #targets of the table of contents."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self._nav = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self._nav |= tag == "nav"
        if tag == "h2" and a.get("id"):
            self.ids.append(a["id"] or "")
        if self._nav and tag == "a":
            self.links.append((a.get("href") or "").removeprefix("#"))

    def handle_endtag(self, tag: str) -> None:
        self._nav &= tag != "nav"


def test_table_of_contents_lists_every_section(full_report: tuple[Path, Any]) -> None:
    _, paths = full_report
    toc = _Toc()
    toc.feed(paths.html.read_text(encoding="utf-8"))
    assert toc.links == toc.ids  # every section, Overfit Sanity and the addendum included
    assert {"preflight", "addendum"} <= set(toc.ids)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_html_renders_in_headless_chromium(full_report: tuple[Path, Any], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, paths = full_report
    # A probe appended to a copy: after load, every image must have decoded, and the page must
    # have found its headings. The report itself stays script-free.
    probe = paths.html.read_text(encoding="utf-8").replace("</body>", """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  // Tables wider than the page would hide their last columns behind a scrollbar.
  const wide = Array.from(document.querySelectorAll("div.scroll"))
    .filter(d => d.scrollWidth > d.clientWidth + 1).length;
  document.body.setAttribute("data-probe", `images=${imgs.length} broken=${bad} h2=${
    document.querySelectorAll("h2").length} wide=${wide}`);
});
</script></body>""")
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1280,2000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r'data-probe="images=(\d+) broken=(\d+) h2=(\d+) wide=(\d+)"', done.stdout)
    assert m, done.stdout[:500]
    images, broken, h2, wide = map(int, m.groups())
    assert images >= 5 and broken == 0 and h2 >= 14
    assert wide == 0  # every table, the quantitative summary included, fits a 1280 px window
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # A screenshot of the real (probe-free) report: the page paints.
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd[:-2], f"--screenshot={shot}",
                    paths.html.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_report_without_spec_or_runs_finished(tmp_path: Path) -> None:
    """A directory from `lmlab train` (no spec, no plan): the report still renders."""
    build_experiment(tmp_path, [Arm("run", {"optimizer.lr": 1e-3}, [5.0])], store_spec=False,
                     preflight=False)
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    assert "No experiment spec is stored here" in md
    assert "## 11. Follow-up Questions" in md
    assert "the spec states no machine-checkable checks" in md


def test_compare_two_experiments(tmp_path: Path) -> None:
    a = build_experiment(tmp_path / "a", CLEAR_WIN, name="sweep-a")
    b = build_experiment(tmp_path / "b", CLEAR_WIN, name="sweep-b", vocab=50257,
                         corpus="wikitext-2-raw-v1")
    c = compare(a, b)
    assert c.names == ("sweep-a", "sweep-b") and not c.comparable
    assert any("tokenizers differ" in n for n in c.notes)
    assert [row[:2] for row in c.rows] == [["sweep-a", "lr1e-3"], ["sweep-a", "lr3e-3"],
                                           ["sweep-b", "lr1e-3"], ["sweep-b", "lr3e-3"]]
    exp = load_experiment(a)
    s = summarize_arms(exp)["lr3e-3"].stats["final_val_loss"]
    assert c.rows[1][3] == f"{s.mean:.4f} ± {s.std:.4f} (n=3)"
    md = c.markdown()
    assert "| sweep-a | lr3e-3 |" in md and "NOT COMPARABLE" in md
    same = compare(a, a)
    assert same.comparable and not any("NOT COMPARABLE" in n for n in same.notes)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(same.table())
    assert "lr3e-3" in console.export_text()


def test_grid_interaction_edge_of_range_and_failures(tmp_path: Path) -> None:
    """A 2x2 grid where the best lr depends on the batch size, the overall best lr is the
    largest tried, one run crashed, and the check is too close to call."""
    grid = [
        Arm("lr1e-3-b8", {"optimizer.lr": 1e-3, "train.batch_size": 8}, [5.00, 5.04, 4.98]),
        Arm("lr3e-3-b8", {"optimizer.lr": 3e-3, "train.batch_size": 8}, [5.02, 4.97, 5.05]),
        Arm("lr1e-3-b16", {"optimizer.lr": 1e-3, "train.batch_size": 16}, [4.90, 4.93, 4.91]),
        Arm("lr3e-3-b16", {"optimizer.lr": 3e-3, "train.batch_size": 16}, [4.70, 4.72, 4.71, ],
            failed={2}),
    ]
    build_experiment(tmp_path, grid, checks=[
        {"metric": "final_val_loss", "arm": "lr3e-3-b8", "op": "<", "than": "lr1e-3-b8"}])
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    # The best mean lr differs between batch sizes, but at batch 8 the two lrs tie (5.007 vs
    # 5.013 over seeds 0-2): no interaction beyond noise.
    assert ("Not shown: the best mean optimizer.lr differs across train.batch_size (0.001 at "
            "train.batch_size = 8; 0.003 at train.batch_size = 16), but at train.batch_size = 8 "
            "the values tie within seed noise") in md
    assert "The best optimizer.lr (0.003) is the largest value tried (0.001 to 0.003): extend " \
           "the sweep upward (e.g. 0.009)" in md
    assert "lr3e-3-b16-s2 failed: RuntimeError: CUDA error: boom" in md
    summary = {r["Config"]: r for r in md_table(md, "Config")}
    assert parse_pm(summary["lr3e-3-b16"]["Final Val Loss"])[2] == 2  # the crash is left out
    assert "1 failed" in summary["lr3e-3-b16"]["Notes"]
    check = md_table(md, "Check")[0]
    assert check["Verdict"] == "INCONCLUSIVE" and "Power: " in check["Why"]
    follow = md.split("## 11. Follow-up Questions")[1]
    assert re.search(r"inconclusive — [^\n]*about \d+ seeds per arm would", follow)
    assert not re.search(r"run \d+ seeds per arm \(about", follow)
    # The difference points against the prediction and is tiny: hundreds of seeds would be
    # needed, which the follow-up says instead of suggesting the run.
    assert re.search(r"would take up to \d{3,} seeds per arm: an effect that small", follow)
    assert "Requires refinement: the verdict is inconclusive" in follow
    assert "1 runs failed or went over budget" in follow
    decision = md.split("## 10. Decision")[1].split("## 11.")[0]
    assert "**(provisional)**" in decision
    assert "- **Selected LR:** optimizer.lr = 0.003" in decision
    # Batch 16 has the best mean at lr 3e-3 (4.70, 4.72; its seed 2 crashed) but two seed pairs
    # against batch 8 do not separate them: no batch size is selected.
    assert "- **Selected batch size:** none shown (provisional): train.batch_size = 16 has the " \
           "best mean but ties within noise with train.batch_size = 8 (lr3e-3-b8" in decision


def test_curves_aggregate_seeds_point_by_point(full_report: tuple[Path, Any]) -> None:
    d, _ = full_report
    exp = load_experiment(d)
    curves = arm_curves(exp, "val_loss", "tokens")
    c = curves["lr3e-3"]
    assert c.n_seeds == 3 and c.x[0] == 0 and c.x[-1] == 60 * 2048
    assert c.mean[-1] == pytest.approx(np.mean([4.80, 4.81, 4.79]))
    assert (c.low[-1], c.high[-1]) == (pytest.approx(4.79), pytest.approx(4.81))
    # The diverged seed of lr1e-2 is not in its arm's mean and band.
    assert curves["lr1e-2"].n_seeds == 2
    assert curves["lr1e-2"].mean[-1] == pytest.approx(np.mean([4.95, 5.00]))
    # Wall-clock x differs per arm (different speeds) but the seeds of one arm share it.
    by_time = arm_curves(exp, "train_loss", "wall_s")
    assert by_time["lr1e-3"].x[-1] == pytest.approx(60 * 2048 / 21_000)


def test_exploding_seed_makes_the_arms_max_grad_norm_infinite(tmp_path: Path) -> None:
    from lmlab.report.format import sig

    cfg = RunConfig()
    with Store.open(tmp_path) as store:
        for seed, grads in ((0, [1.0, 2.0]), (1, [1.0, math.inf]), (2, [3.0, math.nan])):
            rid = f"a-s{seed}"
            store.add_run(rid, "a", seed, cfg.to_json(), cfg.config_hash)
            store.log_many(rid, [(i, i, float(i), {"grad_norm": g}) for i, g in enumerate(grads)])
            store.set_status(rid, "completed", summary={"steps": 2})
    s = summarize_arms(load_experiment(tmp_path))["a"].stats["max_grad_norm"]
    # A NaN gradient norm counts as the largest one (inf), like an inf: no seed drops out.
    assert s.n == 3 and s.mean == math.inf
    assert sig(s.mean, 3) == "∞"


def test_a_diverged_run_has_no_final_metrics_but_its_last_evaluation_is_shown(
        full_report: tuple[Path, Any]) -> None:
    """lr1e-2-s1 blew up at step 34: a "final" loss would be its last pre-blow-up evaluation
    and make the unstable arm look better than it is. It has none; its last evaluation (step
    30) is reported as what it is."""
    _, paths = full_report
    md = paths.markdown.read_text(encoding="utf-8")
    runs = {r["Run"]: r for r in md_table(md, "Run")}
    diverged = runs["lr1e-2-s1"]
    assert diverged["Status"] == "diverged" and diverged["Steps"] == "34"
    for col in ("Final val loss", "Final train loss", "Test loss"):
        assert diverged[col] == "—", col
    assert diverged["Tokens/sec"] != "—" and diverged["Max grad norm"] != "—"
    assert runs["lr1e-2-s0"]["Final val loss"] == "4.9500"
    obs = md.split("### Raw Observations")[1].split("### Quantitative Summary")[0]
    m = re.search(r"lr1e-2-s1 stopped at step 34 \(diverged\), so it has no final metrics; its "
                  r"last evaluation, at step 30 \(61,440 tokens\), had validation loss (\d+\.\d+)",
                  obs)
    assert m, obs
    tau, final = 60 / 4, 5.30  # the synthetic curve of lr1e-2's seed 1 (see _write_run)
    at_30 = final + (9.0 - final) * (math.exp(-30 / tau) - math.exp(-60 / tau))
    assert float(m.group(1)) == pytest.approx(at_30, abs=5e-5)


def test_the_addendum_is_computed_from_the_records(full_report: tuple[Path, Any]) -> None:
    """The spec asks for the addendum (systems_addendum: true): its Compare table is the arms'
    whole-run step time and tokens/sec, peak memory and final validation loss, recomputed here
    from the store."""
    d, paths = full_report
    md = paths.markdown.read_text(encoding="utf-8")
    addendum = md.split("## Memory / Systems Experiment Addendum")[1]
    assert "- **Fixed tokens per run:** 122,880 (yes)" in addendum
    assert "- **Same seed:** 0, 1, 2 in every arm (yes)" in addendum
    assert "- **Same effective batch:** 8 (yes)" in addendum
    table = {r["Config"]: r for r in md_table(addendum, "Config | Step Time")}
    assert list(table) == ["lr1e-3", "lr3e-3", "lr1e-2"]
    with Store(d) as store:
        runs = store.runs()
    for arm, row in table.items():
        measured = [r["summary"] for r in runs if r["arm"] == arm
                    and r["status"] in ("completed", "diverged")]
        step_ms = np.mean([1000 * s["train_s"] / s["steps"] for s in measured])
        tps = np.mean([s["tokens"] / s["train_s"] for s in measured])
        assert row["Step Time"] == f"{step_ms:.1f} ms"
        assert row["Tokens/sec"] == f"{round(tps):,}"
        assert row["Peak VRAM"] == f"{np.mean([s['peak_mem_bytes'] for s in measured]) / 2**20:,.1f} MiB"
    assert table["lr1e-2"]["Final Val Loss"] == f"{np.mean([4.95, 5.00]):.4f}"  # completed only
    assert ("- **Memory saved:** lr3e-3: 2.0 MiB more than lr1e-3 (+0.6%; peak CUDA memory "
            "allocated); lr1e-2: 5.0 MiB more than lr1e-3") in addendum
    assert "- **Speed change:** lr3e-3: -2.4% tokens/sec vs lr1e-3" in addendum
    assert ("lr3e-3: expected to differ from lr1e-3, optimizer.lr changes what is trained"
            in addendum)


def test_systems_prints_the_addendum_of_any_experiment(tmp_path: Path) -> None:
    """``lmlab systems`` computes the addendum from the store even when the spec did not ask for
    it, and prints the same content as the report would."""
    from rich.console import Console

    from lmlab.report import print_addendum

    build_experiment(tmp_path, CLEAR_WIN, checks=[WIN_CHECK])
    console = Console(width=200, record=True)
    print_addendum(tmp_path, console)
    text = console.export_text()
    for line in ("Measurement Conditions", "Fixed tokens per run: 122,880 (yes)",
                 "Compare (reference: lr1e-3)", "Step Time", "Tokens/sec",
                 "Peak memory (RSS)", "Memory saved:", "lr3e-3: 2.0 MiB more than lr1e-3",
                 "lr3e-3: -2.4% tokens/sec vs lr1e-3 (± 0.0%: std over 3 seeds)"):
        assert line in text, line
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    assert "## Memory / Systems Experiment Addendum" not in md  # not asked for by the spec


def test_a_wanted_addendum_without_runs_says_so(tmp_path: Path) -> None:
    spec = {"meta": {"name": "mem", "category": "memory", "seeds": [0]}, "objective": "?",
            "hypothesis": {"mechanism": "m", "prediction": "p", "falsification": "f"},
            "independent": {"variables": ["train.grad_accum"],
                            "arms": {"a1": {"train.grad_accum": 1}, "a4": {"train.grad_accum": 4}}},
            "budget": {"tokens": 4096}, "comparison_axis": "equal_tokens",
            "expected_outcomes": "less memory"}
    with Store.open(tmp_path) as store:
        store.put_result("experiment/spec", {"path": "mem.yaml", "text": json.dumps(spec),
                                             "hash": "h", "spec": spec})
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    addendum = md.split("## Memory / Systems Experiment Addendum")[1]
    assert ("The spec asks for this addendum, but it cannot be computed yet (no runs in this "
            "experiment yet") in addendum
    assert "No runs in the store yet." in md
    from lmlab.errors import UserError
    from lmlab.report import print_addendum

    with pytest.raises(UserError, match="no runs"):
        print_addendum(tmp_path)


def test_results_are_worded_as_the_statistics_allow(tmp_path: Path) -> None:
    """Two norms within noise of each other: a tie everywhere a ranking would be stated, the
    equivalence check read as "interchangeable", Holm across the checks, each expected outcome
    answered, and a prediction about spikes that the data contradict said so."""
    arms = [Arm("layernorm", {"model.norm": "layernorm"}, [5.01, 4.99, 5.02]),
            Arm("rmsnorm", {"model.norm": "rmsnorm"}, [5.00, 5.02, 4.99], spikes={0: [25]})]
    build_experiment(tmp_path, arms, name="norms", category="architecture", checks=[
        {"metric": "final_val_loss", "arm": "rmsnorm", "op": "<", "than": "layernorm"},
        {"metric": "final_val_loss", "arm": "rmsnorm", "op": "equivalent", "than": "layernorm",
         "margin": 0.1}],
        prediction="rmsnorm ends lower; layernorm shows more loss spikes than rmsnorm.",
        expected=["rmsnorm trains as fast",
                  {"outcome": "layernorm shows loss spikes", "check": {
                      "metric": "spike_events", "arm": "layernorm", "op": ">=", "value": 1}},
                  {"outcome": "rmsnorm's early gradient norm is no larger", "check": {
                      "curve": {"metric": "grad_norm", "reduce": "max", "tokens": [0, 40960]},
                      "arm": "rmsnorm", "op": "<=", "than": "layernorm"}}])
    md = write_report(tmp_path).markdown.read_text(encoding="utf-8")
    s9 = md.split("## 9. Interpretation")[1].split("## 10.")[0]
    rows = {r["Check"]: r for r in md_table(s9, "Check")}
    worse = rows["final_val_loss: rmsnorm < layernorm"]
    same = rows["final_val_loss: rmsnorm within ±0.1 of layernorm"]
    assert worse["Verdict"] == "INCONCLUSIVE" and same["Verdict"] == "SUPPORTED"
    assert "Holm-adjusted p = " in worse["Test"] and "Holm share" in worse["Why"]
    assert "P(improvement)" in md_table(s9, "Check")[0] and "seed pairs" in same["P(improvement)"]
    assert "Family-wise α = 0.05 over 3 statistical checks" in s9
    assert ("final_val_loss: rmsnorm < layernorm: inconclusive — rmsnorm − layernorm = "
            "-0.003333 is within noise") in s9
    # Section 9 answers every expected outcome, prose included.
    assert "\u201crmsnorm trains as fast\u201d: not machine-checked" in s9
    assert "\u201clayernorm shows loss spikes\u201d: NOT MET" in s9
    assert "\u201crmsnorm's early gradient norm is no larger\u201d: " in s9
    assert "max grad_norm over tokens [0, 40,960]: rmsnorm <= layernorm" in s9
    # The prediction said layernorm spikes more; only rmsnorm spiked.
    assert ("Predicted: \u201clayernorm shows more loss spikes than rmsnorm\u201d; seen loss "
            "spikes per arm: layernorm 0, rmsnorm 1 — the data contradict it: loss spikes were "
            "seen only in rmsnorm.") in s9
    decision = md.split("## 10. Decision")[1].split("## 11.")[0]
    assert "**(provisional)**" in decision
    assert ("- **Any architectural preference:** interchangeable: model.norm = rmsnorm or "
            "model.norm = layernorm") in decision or ("- **Any architectural preference:** "
                                                      "interchangeable: model.norm = layernorm "
                                                      "or model.norm = rmsnorm") in decision
    assert "are interchangeable within ±0.1 on final_val_loss: equivalence is supported" \
        in decision
    summary = {r["Config"]: r for r in md_table(md, "Config")}
    best = next(arm for arm, r in summary.items() if "best mean" in r["Notes"])
    assert "within noise of" in summary[best]["Notes"]
    assert "best final_val_loss" not in md  # no arm is called best outright
    follow = md.split("## 11. Follow-up Questions")[1]
    assert "is better on final_val_loss: the difference is within seed noise" in follow
