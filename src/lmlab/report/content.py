"""What the report says, section by section, computed from the store: plain strings, labelled
items and tables, with no Markdown or HTML in them. The two templates (``report.md.j2`` and
``report.html.j2``) only lay this out, so both formats say exactly the same thing.

Nothing here is typed by hand: dates, commits and hardware come from the runs' provenance,
resolved settings from the runs' own configs, numbers from :mod:`lmlab.analysis.summary` and
judgements from :mod:`lmlab.analysis.verdict`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from lmlab.analysis.stats import Summary, summarize, welch
from lmlab.analysis.summary import (
    AXIS_X,
    PER_SEED_PATHS,
    ArmSummary,
    Experiment,
    varied_paths,
)
from lmlab.analysis.verdict import CheckResult, HypothesisVerdict, describe_check
from lmlab.config import flatten
from lmlab.report.plots import Figure
from lmlab.spec.expand import addendum_requested
from lmlab.spec.schema import METRICS
from lmlab.store import hardware_summary

CATEGORY_NAMES = {"hyperparam": "Hyperparam", "optimizer": "Optimizer", "memory": "Memory",
                  "architecture": "Architecture", "recipe": "Training Recipe"}
AXIS_BOXES = (("equal_tokens", "Equal tokens seen"), ("equal_steps", "Equal optimizer steps"),
              ("equal_wall_clock", "Equal wall-clock time"))
CHECKED, UNCHECKED = "☑", "☐"
NA = "—"
VARIED = "varied (see 4)"
# Variables the decision section names; every other varied path is listed as "other".
LR_PATHS = ("optimizer.lr", "optimizer.muon_lr")
BATCH_PATHS = ("train.batch_size", "train.grad_accum", "train.batch_size_start",
               "train.batch_ramp_steps")


# -- the building blocks the templates lay out -------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    # "l" or "r" per column (numbers right-aligned).
    align: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.align:
            self.align = ["l"] * len(self.headers)


@dataclass
class Item:
    """A labelled line, as the template writes them: ``Label: value``."""

    label: str
    value: str
    note: str = ""


@dataclass
class Question:
    question: str
    answers: list[str]


# -- number formatting: one place, so tables and tests agree -------------------------------------


def fixed(x: float | None, decimals: int) -> str:
    if x is None or not math.isfinite(x):
        return NA if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:,.{decimals}f}"


def sig(x: float | None, digits: int = 4) -> str:
    if x is None:
        return NA
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:.{digits}g}"


def mib(x: float | None, decimals: int = 1) -> str:
    return NA if x is None or not math.isfinite(x) else f"{x / 2**20:,.{decimals}f} MiB"


def seconds(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return NA
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def integer(x: float | None) -> str:
    return NA if x is None or not math.isfinite(x) else f"{round(x):,}"


def mean_pm(s: Summary, decimals: int, scale: float = 1.0, unit: str = "") -> str:
    """``mean ± std (n=k)``; the std is left out with one seed (there is none)."""
    if s.n == 0:
        return f"{NA} (n=0)"
    mean = fixed(s.mean * scale, decimals)
    if s.n < 2:
        return f"{mean}{unit} (n=1)"
    return f"{mean} ± {fixed(s.std * scale, decimals)}{unit} (n={s.n})"


# Display precision of every quantitative-summary column (decimals, scale, unit). Tests parse
# the table and compare with a recomputation at exactly this precision.
SUMMARY_FORMAT: dict[str, tuple[int, float, str]] = {
    "final_val_loss": (4, 1.0, ""), "final_val_ppl": (2, 1.0, ""),
    "final_val_bpb": (4, 1.0, ""), "final_val_word_ppl": (2, 1.0, ""),
    "tokens_per_s": (0, 1.0, ""), "peak_mem_bytes": (1, 2.0**-20, " MiB"),
}


def metric_pm(a: ArmSummary, metric: str) -> str:
    decimals, scale, unit = SUMMARY_FORMAT.get(metric, (4, 1.0, ""))
    return mean_pm(a.stats[metric], decimals, scale, unit)


def fmt_value(v: Any) -> str:
    """A config value as a reader expects it: 0.001 not 1e-03, lists as tuples, None as —."""
    if v is None:
        return NA
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, list | tuple):
        return "(" + ", ".join(fmt_value(x) for x in v) + ")"
    return str(v)


def memory_label(exp: Experiment) -> str:
    """The template says "Peak VRAM"; on CPU the number is the process's peak RSS, and the
    column must say so rather than pass RSS off as GPU memory."""
    kinds = {r.summary.get("peak_mem_kind") for r in exp.runs if r.summary.get("peak_mem_kind")}
    if not kinds:
        kinds = {"cuda_allocated" if any(r.provenance.get("gpu_count") and
                                         str(r.provenance.get("device", "")).startswith("cuda")
                                         for r in exp.runs) else "rss"}
    if kinds == {"cuda_allocated"}:
        return "Peak VRAM"
    if kinds == {"rss"}:
        return "Peak memory (RSS)"
    return "Peak memory (CUDA allocated / RSS)"


# -- the report ----------------------------------------------------------------------------------


class ReportContent:
    """Builds every section's content. One instance per report; cheap helpers are cached."""

    def __init__(self, exp: Experiment, arms: Mapping[str, ArmSummary],
                 verdict: HypothesisVerdict, figures: Mapping[str, Figure]) -> None:
        self.exp = exp
        self.arms = arms
        self.verdict = verdict
        self.figures = figures
        self.spec = exp.spec
        self.mem_label = memory_label(exp)
        self.primary = self.spec.evaluation.primary_metric if self.spec else "final_val_loss"
        self.direction = METRICS[self.primary]
        self.configs = [r.config for r in exp.runs]
        self.flat = flatten(self.configs[0]) if self.configs else {}
        self.declared = set(exp.variables) | set(
            self.spec.independent.derived if self.spec else {})
        self.varied = set(varied_paths(self.configs))
        self.provs = [r.provenance for r in exp.runs if r.provenance]
        self._under = self._under_trained()

    def context(self) -> dict[str, Any]:
        return {
            "title": self.exp.name,
            "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "directory": str(self.exp.directory),
            "meta": self.meta(),
            "objective": self.spec.objective if self.spec else None,
            "description": self.spec.meta.description if self.spec else None,
            "hypothesis": self.hypothesis(),
            "controlled": self.controlled(),
            "controlled_warnings": self.controlled_warnings(),
            "independent": self.independent(),
            "design": self.design(),
            "metrics": self.metrics_logged(),
            "expected": self.expected(),
            "results": self.results(),
            "interpretation": self.interpretation(),
            "decision": self.decision(),
            "followups": self.followups(),
            "preflight": self.preflight(),
            "addendum": self.addendum(),
            "no_spec": self.spec is None,
        }

    # -- 0. meta ------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        spec = self.spec
        captured = sorted(p["captured_at"] for p in self.provs if p.get("captured_at"))
        if not captured:
            date = "not captured (no run has started)"
        elif captured[0][:16] == captured[-1][:16]:
            date = f"{captured[0][:10]} (runs started {captured[0][11:16]} UTC)"
        elif captured[0][:10] == captured[-1][:10]:
            date = f"{captured[0][:10]} (runs started {captured[0][11:16]}–{captured[-1][11:16]} UTC)"
        else:
            date = f"{captured[0][:10]} to {captured[-1][:10]}"
        commits = Counter((p.get("git_commit"), p.get("git_branch")) for p in self.provs)
        warnings = []
        if not commits:
            commit = "not captured (no run has started)"
        else:
            parts = []
            for (sha, branch), n in commits.items():
                text = (sha[:12] if sha else "not a git checkout") + (f" / {branch}" if branch else
                                                                      " / (detached HEAD)" if sha else "")
                parts.append(text + (f" ({n} runs)" if len(commits) > 1 else ""))
            commit = "; ".join(parts)
            if len(commits) > 1:
                warnings.append(f"runs were made from {len(commits)} different commits")
        dirty = [r.run_id for r in self.exp.runs if r.provenance.get("git_dirty")]
        if dirty:
            commit += " — DIRTY: uncommitted changes to tracked files"
            warnings.append(f"{len(dirty)} of {len(self.exp.runs)} runs ran with uncommitted "
                            "changes: the commit alone does not reproduce them")
        seeds_run = sorted({r.seed for r in self.exp.runs})
        seeds_spec = spec.meta.seeds if spec else seeds_run
        seeds = ", ".join(map(str, seeds_spec)) or NA
        if spec and set(seeds_run) != set(seeds_spec) and seeds_run:
            seeds += f" (runs in the store: {', '.join(map(str, seeds_run))})"
        versions = Counter((p.get("torch_version"), p.get("lmlab_version"), p.get("python_version"))
                           for p in self.provs)
        if len(versions) > 1:
            warnings.append("runs used different torch / lmlab / python versions: "
                            + "; ".join(f"torch {t}, lmlab {lm}, python {py}" for t, lm, py in versions))
        return {
            "items": [
                Item("Experiment Name", self.exp.name),
                Item("Category", CATEGORY_NAMES.get(spec.meta.category, spec.meta.category)
                     if spec else "not recorded (no spec stored)"),
                Item("Date", date),
                Item("Commit Hash / Branch", commit),
                Item("Seed(s)", seeds),
            ],
            "warnings": warnings,
            "versions": "; ".join(f"torch {t}, lmlab {lm}, python {py}"
                                  for t, lm, py in versions) if versions else None,
            "spec": self._spec_record(),
        }

    def _spec_record(self) -> dict[str, str] | None:
        rec = self.exp.spec_record
        if not rec or not rec.get("text"):
            return None
        return {"path": str(rec.get("path") or "?"), "hash": str(rec.get("hash") or "?"),
                "text": str(rec["text"])}

    # -- 2. hypothesis --------------------------------------------------------------------------

    def hypothesis(self) -> dict[str, Any] | None:
        if not self.spec:
            return None
        h = self.spec.hypothesis
        return {"mechanism": h.mechanism, "prediction": h.prediction,
                "falsification": h.falsification, "checks": [describe_check(c) for c in h.checks]}

    # -- 3. controlled variables ----------------------------------------------------------------

    def _v(self, path: str) -> str:
        """One resolved setting: its value in every run, or "varied" when it is an arm's."""
        if path in self.varied:
            return VARIED
        return fmt_value(self.flat.get(path))

    def _settings(self, paths: Iterable[tuple[str, str]]) -> str:
        return ", ".join(f"{label} {self._v(path)}" for label, path in paths)

    def controlled(self) -> list[Item]:
        v = self._v
        items = [Item("Dataset", self._dataset()), Item("Tokenizer config", self._tokenizer())]
        model = self._settings([
            ("n_layer", "model.n_layer"), ("d_model", "model.d_model"),
            ("n_head", "model.n_head"), ("d_ff", "model.d_ff"),
            ("activation", "model.activation"), ("norm", "model.norm"),
            ("norm position", "model.norm_position"), ("positions", "model.positions"),
            ("attention", "model.attention"), ("bias", "model.bias"),
            ("tied embeddings", "model.tie_embeddings"), ("init std", "model.init_std"),
            ("scaled init", "model.scaled_init")])
        if v("model.d_ff") == NA:
            model = model.replace(f"d_ff {NA}", "d_ff default (4×d_model; 8/3×d_model for swiglu)")
        n_params = sorted({int(r.summary["n_params"]) for r in self.exp.runs
                           if r.summary.get("n_params")})
        if n_params:
            model += "; " + ("parameters " + f"{n_params[0]:,}" if len(n_params) == 1 else
                             f"parameters {n_params[0]:,} to {n_params[-1]:,} across arms")
        if self.flat.get("train.init_from") or "train.init_from" in self.varied:
            model += f"; initialised from {v('train.init_from')}"
        items.append(Item("Model config (layers, d_model, heads, etc)", model))
        seq = v("train.seq_len")
        if self.flat.get("train.seq_len_warmup_steps"):
            seq += (f" (ramped from {v('train.seq_len_start')} over "
                    f"{v('train.seq_len_warmup_steps')} steps)")
        items.append(Item("Sequence length", seq))
        items.append(Item("Effective tokens per run", self._tokens_per_run()))
        opt = self._settings([("", "optimizer.name"), ("lr", "optimizer.lr"),
                              ("betas", "optimizer.betas"), ("eps", "optimizer.eps")]).strip()
        name = self.flat.get("optimizer.name")
        if name in ("sgd", "muon") or "optimizer.name" in self.varied:
            opt += f", momentum {v('optimizer.momentum')}, nesterov {v('optimizer.nesterov')}"
        if name == "muon" or "optimizer.name" in self.varied:
            opt += f", muon lr {v('optimizer.muon_lr')}"
        for label, path in (("embedding lr ×", "optimizer.embedding_lr_mult"),
                            ("head lr ×", "optimizer.head_lr_mult")):
            if self.flat.get(path) not in (None, 1.0) or path in self.varied:
                opt += f", {label}{v(path)}"
        opt += f"; grad clip {v('train.grad_clip')}"
        impls = sorted({str(r.summary["optimizer_impl"]) for r in self.exp.runs
                        if r.summary.get("optimizer_impl")})
        opt += f"; implementation {', '.join(impls) if impls else v('optimizer.impl')}"
        items.append(Item("Optimizer (unless this is the optimizer experiment)", opt))
        items.append(Item("Weight decay", f"{v('optimizer.weight_decay')} (applied to norms and "
                                          f"biases: {v('optimizer.decay_norms_and_biases')}; to "
                                          f"embeddings: {v('optimizer.decay_embeddings')})"))
        items.append(Item("Dropout", v("model.dropout")))
        items.append(Item("Scheduler shape", self._schedule()))
        prec = self._settings([("", "train.precision"), ("tf32", "train.tf32"),
                               ("torch.compile", "train.compile"),
                               ("activation checkpointing", "train.activation_checkpointing")])
        items.append(Item("Mixed precision setting", prec.strip()))
        items.append(Item("Hardware (GPU type)", self._hardware()))
        items.append(Item("Seed policy", self._seed_policy()))
        return items

    def _dataset(self) -> str:
        corpora = Counter((p.get("corpus"), bool(p.get("is_wikitext2")), p.get("data_hash"))
                          for p in self.provs if p.get("corpus"))
        if not corpora:
            return f"{self._v('data.dataset')} (planned; no run has recorded its data yet)"
        parts = []
        for (name, is_wt2, digest) in corpora:
            label = "WikiText-2 (wikitext-2-raw-v1)" if is_wt2 else f"{name} (not WikiText-2)"
            parts.append(label + (f", data hash {str(digest)[:12]}" if digest else ""))
        text = "; ".join(parts)
        if len(corpora) > 1:
            text += " — NOT the same data in every run"
        return text

    def _tokenizer(self) -> str:
        kind = self._v("tokenizer.kind")
        vocabs = sorted({int(p["vocab_size"]) for p in self.provs if p.get("vocab_size")})
        hashes = sorted({str(p["tokenizer_hash"])[:12] for p in self.provs if p.get("tokenizer_hash")})
        label = {"bpe": "BPE trained on the training split", "gpt2": "GPT-2 BPE",
                 "byte": "bytes"}.get(str(self.flat.get("tokenizer.kind")), kind)
        if vocabs:
            vocab = ", ".join(f"{v:,}" for v in vocabs)
        else:
            vocab = self._v("tokenizer.vocab_size") + " (configured)"
        text = f"{label}, vocabulary {vocab}"
        if hashes:
            text += f", tokenizer hash {', '.join(hashes)}"
        if len(hashes) > 1 or len(vocabs) > 1:
            text += " — NOT the same tokenizer in every run"
        return text

    def _tokens_per_run(self) -> str:
        planned = sorted({p.get("tokens") for p in (self.exp.plan or {}).get("runs", [])
                          if p.get("tokens")})
        seen = [float(r.summary["tokens"]) for r in self.exp.runs
                if r.status == "completed" and r.summary.get("tokens") is not None]
        tps = sorted({p.get("tokens_per_step") for p in (self.exp.plan or {}).get("runs", [])
                      if p.get("tokens_per_step")})
        parts = []
        if planned:
            parts.append("planned " + " / ".join(integer(t) for t in planned))
        if seen:
            lo, hi = min(seen), max(seen)
            parts.append(f"seen {integer(lo)}" if lo == hi else
                         f"seen {integer(lo)} to {integer(hi)} (mean {integer(np.mean(seen))})")
        if tps:
            parts.append("tokens per step " + " / ".join(integer(t) for t in tps))
        parts.append(f"batch {self._v('train.batch_size')} sequences × seq_len "
                     f"{self._v('train.seq_len')}, grad accumulation {self._v('train.grad_accum')}")
        return "; ".join(parts)

    def _schedule(self) -> str:
        v = self._v
        text = v("schedule.name")
        if self.flat.get("schedule.warmup_frac") is not None or "schedule.warmup_frac" in self.varied:
            frac = self.flat.get("schedule.warmup_frac")
            warm = (VARIED if "schedule.warmup_frac" in self.varied else f"{100 * frac:g}% of the run")
            text += f", warmup {warm}"
        elif "schedule.warmup_steps" in self.varied:
            text += f", warmup steps {VARIED}"
        else:
            text += f", warmup {v('schedule.warmup_steps')} steps"
        text += f", floor {v('schedule.min_lr_ratio')}× peak lr"
        if self.flat.get("schedule.name") == "wsd" or "schedule.name" in self.varied:
            text += f", decay over the last {v('schedule.decay_frac')} of the run (wsd)"
        return text

    def _hardware(self) -> str:
        lines = Counter((hardware_summary(p), str(p.get("device", "?"))) for p in self.provs)
        if not lines:
            return "not captured (no run has started)"
        text = "; ".join(f"{hw} (device {dev})" + (f", {n} runs" if len(lines) > 1 else "")
                         for (hw, dev), n in lines.items())
        if len(lines) > 1:
            text += " — NOT the same hardware in every run: speed and memory are not comparable"
        if self.spec and self.spec.controlled.hardware != "any":
            text += f" (spec asks for {self.spec.controlled.hardware})"
        return text

    def _seed_policy(self) -> str:
        seeds_by_arm = {arm: sorted(r.seed for r in self.exp.runs_of(arm)) for arm in self.exp.arms}
        same = len({tuple(s) for s in seeds_by_arm.values()}) <= 1
        seeds = next(iter(seeds_by_arm.values()), [])
        if same:
            return (f"every arm runs seeds {', '.join(map(str, seeds))}; a seed fixes the "
                    "initialisation, the data order and dropout")
        return "NOT the same seeds in every arm: " + "; ".join(
            f"{arm}: {', '.join(map(str, s))}" for arm, s in seeds_by_arm.items())

    def controlled_warnings(self) -> list[str]:
        """Settings that differ between runs without being declared independent. Budgets are
        excluded: the comparison axis resolves them per arm on purpose (equal tokens with
        different batch sizes means different step counts)."""
        undeclared = sorted(p for p in self.varied - self.declared - PER_SEED_PATHS
                            if not p.startswith("budget."))
        if not undeclared:
            return []
        return [f"{p} differs between runs but is not a declared independent variable"
                for p in undeclared]

    # -- 4. independent variables ---------------------------------------------------------------

    def independent(self) -> dict[str, Any]:
        variables = self.exp.variables
        values = {arm: self.exp.arm_values(arm) for arm in self.exp.arms}
        derived = self.spec.independent.derived if self.spec else {}
        rows = []
        for var in [*variables, *(p for p in derived if p not in variables)]:
            seen: list[str] = []
            for arm in self.exp.arms:
                text = fmt_value(values[arm].get(var))
                if text not in seen:
                    seen.append(text)
            rows.append([var, ", ".join(seen) + (f" (derived: {derived[var]})"
                                                 if var in derived else "")])
        arm_rows = []
        for arm in self.exp.arms:
            label = arm + (" (reference)" if arm == self.exp.reference else "")
            arm_rows.append([label] + [fmt_value(values[arm].get(v)) for v in variables]
                            + [str(len(self.exp.runs_of(arm)))])
        return {
            "table": Table(["Variable", "Values"], rows),
            "arms": Table(["Arm", *variables, "Runs"], arm_rows,
                          ["l"] + ["r"] * len(variables) + ["r"]),
            "design": self._design_kind(),
        }

    def _design_kind(self) -> str:
        if not self.spec:
            return "arms as recorded in the store"
        ind = self.spec.independent
        kind = "grid (every combination)" if ind.grid else "zip (values paired)" if ind.zip \
            else "named arms"
        return f"{kind}; {len(self.exp.arms)} arms × {len(self.spec.meta.seeds)} seeds"

    # -- 5. design ------------------------------------------------------------------------------

    def design(self) -> dict[str, Any]:
        plan_runs = (self.exp.plan or {}).get("runs", [])
        runs = self.exp.runs
        done = [r for r in runs if r.summary]

        def planned(key: str, fmt: Any) -> str:
            values = sorted({p[key] for p in plan_runs if p.get(key) is not None})
            return " / ".join(fmt(v) for v in values) if values else "not set"

        def actual(key: str, fmt: Any) -> str:
            values = [float(r.summary[key]) for r in done if r.summary.get(key) is not None]
            if not values:
                return "no run has finished"
            lo, hi = min(values), max(values)
            return fmt(lo) if lo == hi else f"{fmt(lo)} to {fmt(hi)} (mean {fmt(np.mean(values))})"

        budget = self.spec.budget if self.spec else None
        est_run = [float(p["estimate_s"]) for p in plan_runs if p.get("estimate_s") is not None]
        est_total = (self.exp.plan or {}).get("estimate_total_s")
        wall = [float(r.summary["wall_s"]) for r in done if r.summary.get("wall_s") is not None]
        train = [float(r.summary["train_s"]) for r in done if r.summary.get("train_s") is not None]
        expected = (f"estimated {seconds(np.mean(est_run))} per run" if est_run else "no estimate")
        if est_total is not None:
            expected += f", {seconds(float(est_total))} in total"
        if wall:
            expected += (f"; actual {seconds(np.mean(wall))} per run on average "
                         f"({seconds(np.mean(train)) if train else NA} of it training), "
                         f"{seconds(sum(wall))} in total over {len(wall)} runs")
        if budget and budget.wall_clock_s:
            expected += f"; wall-clock budget {seconds(budget.wall_clock_s)} of training per run"
        max_mem = budget.max_memory_mb if budget else None
        peaks = [float(r.metrics["peak_mem_bytes"]) for r in runs
                 if r.metrics.get("peak_mem_bytes") is not None]
        mem = (f"{max_mem:,.0f} MiB" if max_mem else "no limit set") + \
            (f"; measured {self.mem_label} up to {mib(max(peaks))}" if peaks else "")
        budget_items = [
            Item("Tokens per run", f"{planned('tokens', integer)} planned; "
                                   f"{actual('tokens', integer)} seen"),
            Item("Steps per run", f"{planned('steps', integer)} planned; "
                                  f"{actual('steps', integer)} run"),
            Item("Expected wall-clock", expected),
            Item("Max VRAM allowed", mem),
        ]
        return {"budget": budget_items, "protocol": self._protocol(),
                "axis": [Item(CHECKED if key == self.exp.axis else UNCHECKED, label)
                         for key, label in AXIS_BOXES],
                "axis_note": self._axis_note()}

    def _axis_note(self) -> str:
        x = AXIS_X.get(self.exp.axis, "tokens")
        return {"tokens": "every arm trains on the same number of tokens; curves are drawn "
                          "against tokens seen",
                "step": "every arm takes the same number of optimizer steps; curves are also "
                        "drawn against steps",
                "wall_s": "every arm trains for the same training seconds (evaluation "
                          "excluded); curves are also drawn against training time"}[x]

    def _names(self) -> set[str]:
        return {n for r in self.exp.runs for n in r.curves}

    def _count(self, name: str) -> int:
        return sum(len(r.curves.get(name, [])) for r in self.exp.runs)

    def _protocol(self) -> list[Item]:
        names = self._names()
        cfg = self.flat
        n_runs = max(len([r for r in self.exp.runs if r.curves]), 1)
        evals = self._count("val_loss") / n_runs
        cadence = ("every " + integer(cfg["eval.every_tokens"]) + " tokens"
                   if cfg.get("eval.every_tokens") else
                   f"every {cfg['eval.every_steps']} steps" if cfg.get("eval.every_steps") else
                   f"every {cfg['eval.every_seconds']:g} training seconds"
                   if cfg.get("eval.every_seconds") else "at every tenth of the run")
        split = ("the full validation split" if not cfg.get("eval.max_batches") else
                 f"{cfg['eval.max_batches']} batches of {cfg.get('eval.batch_size')} windows "
                 "(capped, not the full split)")
        every_k = cfg.get("diagnostics.every_steps")
        clip = cfg.get("train.grad_clip")

        def logged(name: str, text: str) -> str:
            return text if name in names else "not logged"

        return [
            Item("Train loss", logged("train_loss", "every optimizer step (cross-entropy, "
                                                    "before any label smoothing or z-loss)")),
            Item("Validation loss", logged("val_loss", f"{cadence} on {split}, plus step 0 "
                                                       f"({evals:.0f} evaluations per run)")),
            Item("Perplexity", logged("val_ppl", "validation perplexity, bits per byte and "
                                                 "word-level perplexity at every evaluation"
                                      + ("; test split at the end" if "test_loss" in names else ""))),
            Item("Throughput (tokens/sec)", logged("tokens_per_s", "per log interval (every "
                                                   f"{cfg.get('eval.log_every_steps')} steps), over "
                                                   "training time with evaluation excluded")),
            Item("Peak VRAM", logged("peak_mem_bytes",
                                     "CUDA allocator peak (allocated; reserved logged too)"
                                     if self.mem_label == "Peak VRAM" else
                                     "process peak resident memory (RSS): CPU runs, no VRAM")),
            Item("Gradient norm (global)", logged("grad_norm", "every step, before clipping"
                                                  + (f" (clipped at {clip:g})" if clip else
                                                     " (no clipping)"))),
            Item("(Optional) Layer-wise grad norms",
                 f"every {every_k} steps, per block and per parameter kind"
                 if any(n.startswith("grad_norm/block.") for n in names) else "not logged"),
        ]

    # -- 6. metrics -----------------------------------------------------------------------------

    def metrics_logged(self) -> dict[str, Any]:
        names = self._names()
        ev = Counter(e["kind"] for r in self.exp.runs for e in r.events)

        def has(prefix: str) -> bool:
            return any(n.startswith(prefix) for n in names)

        def status(flag: bool, where: str) -> str:
            return f"logged — {where}" if flag else "not logged"

        x = AXIS_X.get(self.exp.axis, "tokens")
        core = [
            Item("Train loss vs tokens", status("train_loss" in names, "figure: loss curves")),
            Item("Val loss vs tokens", status("val_loss" in names, "figure: loss curves")),
            Item("Perplexity", status("val_ppl" in names, "quantitative summary (8)")),
            Item("Step time", status("step_time_s" in names, "per log interval; "
                                     "quantitative summary via tokens/sec")),
            Item("Peak memory", status("peak_mem_bytes" in names, "figure: throughput and memory")),
        ]
        stability = [
            Item("Global gradient norm", status("grad_norm" in names, "figure: gradient norm")),
            Item("NaNs / divergence events", f"{ev.get('nan', 0)} NaN and "
                                             f"{ev.get('divergence', 0)} divergence events "
                                             "(marked on the train-loss curves)"),
            Item("Loss spikes", f"{ev.get('spike', 0)} spike events (marked on the train-loss "
                                "curves)"),
        ]
        optional = [
            Item("Activation norms (first/middle/last layer)",
                 status(has("act_rms/"), "figure: diagnostics")),
            Item("LN weight/bias gradient norms", status(has("norm_grad_norm/"),
                                                         "figure: diagnostics")),
            Item("Attention entropy", status(has("attn_entropy/"), "figure: diagnostics (per "
                                             "layer; per head in the store)")),
        ]
        order = dict.fromkeys(["loss_tokens", f"loss_{x}", "grad_norm", "speed_memory",
                               "diagnostics"])  # ordered and unique (x may be "tokens")
        return {"core": core, "stability": stability, "optional": optional,
                "figures": [self.figures[k] for k in order if k in self.figures]}

    # -- 7. expected outcomes -------------------------------------------------------------------

    def expected(self) -> list[str]:
        if not self.spec:
            return []
        e = self.spec.expected_outcomes
        return [e] if isinstance(e, str) else list(e)

    # -- 8. results -----------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        headers = ["Config", "Final Val Loss", "Final PPL", "Bits/byte", "Word PPL",
                   "Tokens/sec", self.mem_label, "Notes"]
        rows = []
        best = self._best_arm()
        for arm, a in self.arms.items():
            rows.append([arm] + [metric_pm(a, m) for m in (
                "final_val_loss", "final_val_ppl", "final_val_bpb", "final_val_word_ppl",
                "tokens_per_s", "peak_mem_bytes")] + ["; ".join(self._notes(arm, best))])
        per_run = []
        for r in self.exp.runs:
            m = r.metrics
            events = ", ".join(f"{k} {n}" for k, n in sorted(Counter(
                e["kind"] for e in r.events).items())) or NA
            per_run.append([r.run_id, r.arm, str(r.seed), r.status, integer(r.summary.get("steps")),
                            integer(r.summary.get("tokens")), fixed(m.get("final_val_loss"), 4),
                            fixed(m.get("final_train_loss"), 4), fixed(m.get("test_loss"), 4),
                            fixed(m.get("tokens_per_s"), 0), mib(m.get("peak_mem_bytes")),
                            sig(m.get("max_grad_norm"), 3), events])
        return {
            "observations": self.observations(),
            "summary": Table(headers, rows, ["l"] + ["r"] * 6 + ["l"]),
            "summary_note": ("mean ± std over seeds (n = seeds included). Completed runs only "
                             "for end-of-run metrics; see the notes column for seeds left out."),
            "per_run": Table(["Run", "Arm", "Seed", "Status", "Steps", "Tokens", "Final val loss",
                              "Final train loss", "Test loss", "Tokens/sec", self.mem_label,
                              "Max grad norm", "Events"], per_run,
                             ["l", "l", "r", "l"] + ["r"] * 8 + ["l"]),
        }

    def _notes(self, arm: str, best: str | None) -> list[str]:
        notes = []
        if arm == best:
            notes.append(f"best {self.primary}")
        if arm == self.exp.reference and len(self.arms) > 1:
            notes.append("reference")
        counts = self.arms[arm].status_counts
        for status in ("diverged", "failed", "over_budget", "interrupted", "running", "pending"):
            if counts.get(status):
                notes.append(f"{counts[status]} {status.replace('_', ' ')}")
        spikes = sum(1 for r in self.arms[arm].runs for e in r.events if e["kind"] == "spike")
        if spikes:
            notes.append(f"{spikes} loss spike{'s' if spikes > 1 else ''}")
        if arm in self._under:
            notes.append("still improving at the end")
        return notes

    def observations(self) -> list[str]:
        out: list[str] = []
        runs = self.exp.runs
        for r in runs:
            for e in r.events:
                d = e["detail"]
                if e["kind"] == "divergence":
                    out.append(f"{r.run_id} diverged at step {e['step']:,} ({e['tokens']:,} "
                               f"tokens): loss {sig(d.get('loss'))} above "
                               f"{sig(d.get('factor'), 3)}× its early loss {sig(d.get('early_loss'))}.")
                elif e["kind"] == "nan":
                    out.append(f"{r.run_id} hit a non-finite loss or gradient norm at step "
                               f"{e['step']:,} ({e['tokens']:,} tokens; loss {sig(d.get('loss'))}, "
                               f"grad norm {sig(d.get('grad_norm'))}); it stopped before the "
                               "optimizer step.")
                elif e["kind"] == "oom":
                    out.append(f"{r.run_id} ran out of memory at step {e['step']:,}.")
                elif e["kind"] == "over_budget":
                    out.append(f"{r.run_id} exceeded the memory budget at step {e['step']:,}: "
                               f"peak {mib(d.get('peak_mem_bytes'))} > "
                               f"{sig(d.get('max_memory_mb'))} MiB.")
        for arm in self.exp.arms:
            spikes = [(r, e) for r in self.exp.runs_of(arm) for e in r.events if e["kind"] == "spike"]
            if spikes:
                seeds = sorted({r.seed for r, _ in spikes})
                r, worst = max(spikes, key=lambda re: float(re[1]["detail"].get("z") or 0.0))
                d = worst["detail"]
                out.append(f"{arm}: {len(spikes)} loss spike{'s' if len(spikes) > 1 else ''} in "
                           f"{len(seeds)} of {len(self.exp.runs_of(arm))} seeds; the largest "
                           f"(z = {sig(d.get('z'), 3)}) at step {worst['step']:,} of seed {r.seed}, "
                           f"loss {sig(d.get('loss'))} against a running mean of "
                           f"{sig(d.get('mean'))}.")
        for arm, (drop, spread, evals) in self._under.items():
            spread_text = (f"more than the seed spread ({fixed(spread, 4)})" if spread is not None
                           else "more than 1% of the loss (one seed: no spread)")
            out.append(f"{arm} was still improving at the end: validation loss fell by "
                       f"{fixed(drop, 4)} over the last {evals} evaluations, {spread_text}; "
                       "under-trained at this budget.")
        out += self._disagreeing_seeds()
        out += self._noisy_throughput()
        pre = self.exp.preflight
        if pre:
            for c in pre.get("configs", []):
                if not c.get("passed"):
                    out.append(f"Preflight failed for {c.get('key')} (arms "
                               f"{', '.join(c.get('arms', []))}): {self._preflight_why(c)}.")
        for r in runs:
            if r.status == "failed":
                err = (r.error or "no error recorded").strip().splitlines()
                out.append(f"{r.run_id} failed: {err[-1] if err else 'no error recorded'}")
            elif r.status == "over_budget" and not any(e["kind"] in ("oom", "over_budget")
                                                       for e in r.events):
                out.append(f"{r.run_id} stopped over budget ({r.summary.get('reason', 'no reason')}).")
        unfinished = [r for r in runs if r.status in ("pending", "running", "interrupted")]
        if unfinished:
            counts = Counter(r.status for r in unfinished)
            out.append("Not finished: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                       + " — this report is partial.")
        fallbacks = sorted({r.run_id for r in runs for e in r.events
                            if e["kind"] == "compile_fallback"})
        if fallbacks:
            out.append(f"torch.compile fell back to eager mode in {', '.join(fallbacks)}.")
        resumed = sorted({r.run_id for r in runs for e in r.events if e["kind"] == "resume"})
        if resumed:
            out.append(f"Resumed from a checkpoint: {', '.join(resumed)}.")
        for e in self.exp.experiment_events:
            if e["kind"] == "preflight":
                continue  # its outcome is reported from the preflight record itself
            detail = ", ".join(f"{k} {v}" for k, v in sorted(e["detail"].items()))
            out.append(f"Experiment event '{e['kind']}'" + (f": {detail}." if detail else "."))
        unstable = any(e["kind"] in ("nan", "divergence", "spike") for r in runs for e in r.events)
        started = [r for r in runs if r.curves]
        if started and not unstable:
            done = sum(r.status == "completed" for r in runs)
            out.insert(0, f"{done} of {len(runs)} runs completed; no NaN, divergence or "
                          f"loss-spike events in the {len(started)} that have started.")
        if not started:
            out.insert(0, "No run has logged anything yet." if runs else "No runs in the store yet.")
        return out

    def _under_trained(self) -> dict[str, tuple[float, float | None, int]]:
        """Arms whose validation loss was still falling over the last two evaluation intervals
        by more than the seed-to-seed spread of the final loss: a longer budget would likely
        change the numbers (and possibly the ranking)."""
        out = {}
        for arm, a in self.arms.items():
            drops = []
            for r in a.runs:
                val = [row.value for row in r.curves.get("val_loss", [])]
                if r.status == "completed" and len(val) >= 3 and all(map(math.isfinite, val[-3:])):
                    drops.append(val[-3] - val[-1])
            if not drops:
                continue
            drop = float(np.mean(drops))
            s = a.stats["final_val_loss"]
            spread = s.std if s.n >= 2 else None
            threshold = spread if spread is not None else 0.01 * abs(s.mean)
            if drop > 0 and drop > threshold:
                out[arm] = (drop, spread, 2)
        return out

    def _disagreeing_seeds(self) -> list[str]:
        means = {arm: a.stats[self.primary].mean for arm, a in self.arms.items()
                 if a.stats[self.primary].n >= 1}
        out = []
        for arm, a in self.arms.items():
            s = a.stats[self.primary]
            if s.n < 2 or len(means) < 2:
                continue
            gap = min(abs(s.mean - m) for other, m in means.items() if other != arm)
            if s.std >= gap:
                out.append(f"{arm}: its seeds disagree — the std of {self.primary} over seeds "
                           f"({sig(s.std, 3)}) is at least the gap to the nearest arm "
                           f"({sig(gap, 3)}), so its rank among the arms is not reliable.")
        return out

    def _noisy_throughput(self) -> list[str]:
        """Seeds of one arm do the same work, so their speeds should agree within a few percent;
        a large spread means the machine was shared or throttled, and speed comparisons between
        arms are unreliable."""
        out = []
        for arm, a in self.arms.items():
            s = a.stats["tokens_per_s"]
            if s.n >= 2 and s.mean > 0 and s.std / s.mean > 0.15:
                out.append(f"{arm}: throughput varies across seeds ({integer(s.mean)} ± "
                           f"{integer(s.std)} tokens/s, {100 * s.std / s.mean:.0f}% relative); "
                           "the machine was probably shared, so speed comparisons are unreliable.")
        return out

    # -- 9. interpretation ----------------------------------------------------------------------

    def interpretation(self) -> dict[str, Any]:
        v = self.verdict
        rows = [[c.description, c.verdict.upper(), self._diff_text(c), self._test_text(c),
                 c.reason + (f". Power: {c.power_note}" if c.power_note else "")]
                for c in v.checks]
        questions = [
            Question("Did results match hypothesis?", self._matched()),
            Question("Any instability?", self._instability()),
            Question("Any unexpected interactions?", self._interactions()),
            Question("Was performance compute-efficient?", self._efficiency_answers()),
        ]
        return {
            "overall": v.overall.upper(),
            "overall_reason": v.reason,
            "checks": Table(["Check", "Verdict", "Difference (95% CI)", "Test", "Why"], rows),
            "questions": questions,
            "efficiency": self._efficiency_table(),
        }

    @staticmethod
    def _diff_text(c: CheckResult) -> str:
        if not math.isfinite(c.diff):
            return NA
        text = f"{c.diff:+.4g}"
        if c.ci_low is not None and c.ci_high is not None and c.ci_low != c.ci_high:
            text += f" [{c.ci_low:+.4g}, {c.ci_high:+.4g}]"
        if c.ci90_low is not None and c.ci90_high is not None and c.ci90_low != c.ci90_high:
            text += f"; 90% CI [{c.ci90_low:+.4g}, {c.ci90_high:+.4g}]"
        ref = "value" if c.n_ref is None else c.reference
        text += f" ({c.arm} {sig(c.mean_arm)} vs {ref} {sig(c.mean_ref)})"
        return text

    @staticmethod
    def _test_text(c: CheckResult) -> str:
        n = f"n={c.n_arm}" + (f" vs {c.n_ref}" if c.n_ref is not None else "")
        p = f", p = {c.p:.3g}" if c.p is not None else ""
        return f"{c.test}{p} ({n})"

    def _matched(self) -> list[str]:
        v = self.verdict
        if not v.checks:
            return [f"{v.overall.capitalize()}: {v.reason}; judge the prediction against the "
                    "quantitative summary by hand."]
        out = [f"Overall: {v.overall.upper()} — {v.reason}."]
        for c in v.checks:
            out.append(f"{c.description}: {c.verdict} ({c.reason}).")
        return out

    def _instability(self) -> list[str]:
        out = []
        all_stable = True
        for arm, a in self.arms.items():
            ev = Counter(e["kind"] for r in a.runs for e in r.events)
            bad = {k: ev[k] for k in ("nan", "divergence", "spike", "oom") if ev.get(k)}
            g = a.stats["max_grad_norm"]
            grad = f"largest gradient norm {sig(g.mean, 3)} (mean over seeds)" if g.n else ""
            if bad:
                all_stable = False
                out.append(f"{arm}: " + ", ".join(f"{n} {k}" for k, n in bad.items())
                           + (f"; {grad}" if grad else "") + ".")
            elif grad:
                out.append(f"{arm}: stable (no NaN, divergence or spike events); {grad}.")
        if not out:
            return ["No data yet."]
        if all_stable:
            out.insert(0, "No: every arm trained without NaN, divergence or spike events.")
        else:
            out.insert(0, "Yes — see the arms below and the markers on the loss curves.")
        return out

    def _interactions(self) -> list[str]:
        variables = [v for v in self.exp.variables if v not in PER_SEED_PATHS]
        if len(variables) < 2:
            name = variables[0] if variables else "none"
            return [f"One independent variable ({name}): no interaction to look for."]
        means = {arm: a.stats[self.primary].mean for arm, a in self.arms.items()
                 if a.stats[self.primary].n}
        values = {arm: self.exp.arm_values(arm) for arm in means}
        pick = min if self.direction == "lower" else max
        out = []
        for var in variables:
            for other in variables:
                if other == var:
                    continue
                groups: dict[str, list[str]] = {}
                for arm in means:
                    groups.setdefault(fmt_value(values[arm].get(other)), []).append(arm)
                best = {}
                for level, arms in groups.items():
                    if len({fmt_value(values[a].get(var)) for a in arms}) >= 2:
                        winner = pick(arms, key=lambda a: means[a])
                        best[level] = fmt_value(values[winner].get(var))
                if len(best) < 2:
                    continue
                detail = "; ".join(f"{b} at {other} = {lvl}" for lvl, b in best.items())
                if len(set(best.values())) > 1:
                    out.append(f"Yes: the best {var} depends on {other} ({detail}).")
                else:
                    out.append(f"No: the best {var} is {next(iter(best.values()))} at every "
                               f"{other} tried.")
        if not out:
            return ["The design does not cross the variables (no value of one is tried at "
                    "several values of another): interactions cannot be read from it."]
        out.append(f"(Judged on mean {self.primary}; differences smaller than the seed spread in "
                   "the quantitative summary are not evidence of an interaction.)")
        return out

    def _efficiency(self) -> tuple[float | None, dict[str, tuple[Summary, Summary]]]:
        """The validation loss every included run reached (the highest final one) and, per arm,
        the tokens and training seconds each seed needed to first evaluate at or below it,
        summarised over seeds. Per seed, because seeds of one arm are evaluated at different
        training seconds and a mean curve on a shared time grid blurs exactly that."""
        finals = [v for a in self.arms.values() for v in a.seeds_values("final_val_loss")]
        if not finals:
            return None, {}
        target = max(finals)
        out: dict[str, tuple[Summary, Summary]] = {}
        for arm, a in self.arms.items():
            tokens, secs = [], []
            for r in a.runs:
                if not r.included("final_val_loss"):
                    continue
                hit = next((row for row in r.curves.get("val_loss", [])
                            if math.isfinite(row.value) and row.value <= target + 1e-12), None)
                if hit is not None:
                    tokens.append(float(hit.tokens))
                    secs.append(float(hit.wall_s))
            if tokens:
                out[arm] = (summarize(tokens), summarize(secs))
        return target, out

    def _efficiency_table(self) -> Table | None:
        target, reach = self._efficiency()
        if target is None:
            return None
        rows = []
        for arm, (tok, sec) in reach.items():
            a = self.arms[arm]
            rows.append([arm, metric_pm(a, "final_val_loss"), metric_pm(a, "tokens_per_s"),
                         mean_pm(tok, 0), mean_pm(sec, 1, unit=" s")])
        return Table(["Arm", "Final val loss", "Tokens/sec", f"Tokens to val loss {target:.4f}",
                      f"Training time to val loss {target:.4f}"], rows,
                     ["l", "r", "r", "r", "r"])

    def _efficiency_answers(self) -> list[str]:
        target, reach = self._efficiency()
        if target is None:
            return ["No completed run yet."]
        out = [f"Target: validation loss {target:.4f}, the highest final loss of any included "
               "run (so every run reached it); per seed, the first evaluation at or below it, "
               "averaged over seeds (training seconds exclude evaluation)."]
        tok = {a: t.mean for a, (t, _) in reach.items()}
        sec = {a: s.mean for a, (_, s) in reach.items()}
        if tok:
            a = min(tok, key=lambda k: tok[k])
            out.append(f"Fewest tokens: {a} ({integer(tok[a])} tokens).")
        if sec:
            a = min(sec, key=lambda k: sec[k])
            out.append(f"Least training time: {a} ({seconds(sec[a])}).")
        if tok and sec and min(tok, key=lambda k: tok[k]) != min(sec, key=lambda k: sec[k]):
            out.append("The most token-efficient arm is not the fastest in wall-clock: its "
                       "per-token gain costs throughput.")
        speeds = {arm: a.stats["tokens_per_s"].mean for arm, a in self.arms.items()
                  if a.stats["tokens_per_s"].n}
        if len(speeds) > 1:
            fast, slow = max(speeds, key=lambda k: speeds[k]), min(speeds, key=lambda k: speeds[k])
            out.append(f"Throughput ranges from {integer(speeds[slow])} tokens/s ({slow}) to "
                       f"{integer(speeds[fast])} tokens/s ({fast}).")
        return out

    # -- 10. decision ---------------------------------------------------------------------------

    def _best_arm(self) -> str | None:
        stats = {arm: a.stats[self.primary].mean for arm, a in self.arms.items()
                 if a.stats[self.primary].n and math.isfinite(a.stats[self.primary].mean)}
        if not stats:
            return None
        pick = min if self.direction == "lower" else max
        return pick(stats, key=lambda k: stats[k])

    def decision(self) -> dict[str, Any]:
        best = self._best_arm()
        variables = set(self.exp.variables)
        if best is None:
            return {"items": [], "provisional": True,
                    "notes": [f"No arm has a defined {self.primary} yet: nothing to adopt."]}
        run = self.arms[best].runs[0]
        flat = flatten(run.config)

        def pick(paths: Sequence[str], label: str, keep: set[str]) -> Item:
            chosen = [p for p in paths if p in variables]
            keep.update(chosen)
            if not chosen:
                fixed_vals = ", ".join(f"{p} = {fmt_value(self.flat.get(p))}" for p in paths[:1])
                return Item(label, f"n/a (not varied; {fixed_vals} throughout)")
            return Item(label, ", ".join(f"{p} = {fmt_value(flat.get(p))}" for p in chosen))

        used: set[str] = set()
        items = [pick(LR_PATHS, "Selected LR", used), pick(BATCH_PATHS, "Selected batch size", used)]
        opt_paths = sorted(p for p in variables if p.startswith("optimizer.") and p not in LR_PATHS)
        if opt_paths:
            used.update(opt_paths)
            items.append(Item("Selected optimizer", ", ".join(
                f"{p} = {fmt_value(flat.get(p))}" for p in opt_paths)))
        else:
            items.append(Item("Selected optimizer",
                              f"n/a (not varied; {fmt_value(self.flat.get('optimizer.name'))} "
                              "throughout)"))
        arch = sorted(p for p in variables if p.startswith("model."))
        used.update(arch)
        items.append(Item("Any architectural preference", ", ".join(
            f"{p} = {fmt_value(flat.get(p))}" for p in arch) if arch else "n/a (not varied)"))
        rest = sorted(variables - used - PER_SEED_PATHS)
        if rest:
            items.append(Item("Other settings of the selected arm", ", ".join(
                f"{p} = {fmt_value(flat.get(p))}" for p in rest)))
        provisional = self.verdict.overall != "supported"
        notes = [f"Best arm by {self.primary} ({self.direction} is better): {best}, "
                 f"{metric_pm(self.arms[best], self.primary)}."]
        notes += self._runner_up(best)
        if provisional:
            notes.append(f"PROVISIONAL: the hypothesis verdict is {self.verdict.overall}; adopt "
                         "only after the follow-ups below.")
        return {"items": items, "provisional": provisional, "notes": notes}

    def _runner_up(self, best: str) -> list[str]:
        others = {arm: a.stats[self.primary].mean for arm, a in self.arms.items()
                  if arm != best and a.stats[self.primary].n}
        if not others:
            return []
        pick = min if self.direction == "lower" else max
        second = pick(others, key=lambda k: others[k])
        a = self.arms[best].seeds_values(self.primary)
        b = self.arms[second].seeds_values(self.primary)
        w = welch(a, b)
        if w.testable and w.ci_low is not None and w.ci_high is not None:
            sep = "separated" if (w.ci_low > 0 or w.ci_high < 0) else "NOT separated"
            return [f"Over the runner-up {second}: difference {w.diff:+.4g}, 95% CI "
                    f"[{w.ci_low:+.4g}, {w.ci_high:+.4g}], Welch p = {w.p:.3g} ({sep} at 5%)."]
        return [f"Over the runner-up {second}: difference {w.diff:+.4g}; {w.reason}, so the "
                "ranking is not tested."]

    # -- 11. follow-ups -------------------------------------------------------------------------

    def followups(self) -> list[Question]:
        unclear, sweep = [], []
        for c in self.verdict.checks:
            if c.verdict == "inconclusive":
                unclear.append(f"{c.description}: inconclusive — "
                               + (f"run {c.seeds_needed} seeds per arm ({c.power_note})."
                                  if c.seeds_needed else f"{c.power_note or c.reason}."))
        single = [arm for arm, a in self.arms.items() if a.stats[self.primary].n == 1]
        if single:
            unclear.append(f"Only one seed in {', '.join(single)}: run at least 3 to measure the "
                           "seed-to-seed spread.")
        unclear += [line.split(" — ")[0] + ": run more seeds to rank it."
                    for line in self._disagreeing_seeds()]
        if not unclear:
            unclear.append("Nothing the data flags: every check was decided.")
        best = self._best_arm()
        if best is not None:
            sweep += self._edge_of_range(best)
        diverged = [arm for arm, a in self.arms.items() if a.status_counts.get("diverged")]
        for arm in diverged:
            lr = self.exp.arm_values(arm).get("optimizer.lr", self.flat.get("optimizer.lr"))
            sweep.append(f"{arm} diverged in {self.arms[arm].status_counts['diverged']} of "
                         f"{len(self.arms[arm].runs)} seeds: retry it with a lower learning rate "
                         f"(now {fmt_value(lr)}) or a longer warmup.")
        if self._under:
            sweep.append(f"{', '.join(self._under)} still improving at the end: a longer budget "
                         "(e.g. 2× tokens) would show whether the ranking holds.")
        if not sweep:
            sweep.append("Not yet: no arm has a result." if best is None else
                         "No: the best arm lies inside the swept range and no arm diverged or "
                         "was under-trained.")
        return [Question("What remains unclear?", unclear),
                Question("What needs a deeper sweep?", sweep),
                Question("Does this move to Phase-1 or require refinement?", self._phase1())]

    def _edge_of_range(self, best: str) -> list[str]:
        out = []
        best_values = self.exp.arm_values(best)
        for var in self.exp.variables:
            levels = sorted({float(v) for arm in self.exp.arms
                             if isinstance(v := self.exp.arm_values(arm).get(var), int | float)
                             and not isinstance(v, bool)})
            value = best_values.get(var)
            if len(levels) < 2 or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if float(value) not in (levels[0], levels[-1]):
                continue
            upward = float(value) == levels[-1]
            if not upward and levels[0] <= 0 <= min(levels):
                continue  # 0 warmup steps, 0 dropout: nothing lies below a natural zero
            if all(x > 0 for x in levels):
                ratio = levels[-1] / levels[-2] if upward else levels[1] / levels[0]
                nxt = float(value) * ratio if upward else float(value) / ratio
            else:
                step = levels[-1] - levels[-2] if upward else levels[1] - levels[0]
                nxt = float(value) + step if upward else float(value) - step
            out.append(f"The best {var} ({fmt_value(value)}) is the "
                       f"{'largest' if upward else 'smallest'} value tried "
                       f"({fmt_value(levels[0])} to {fmt_value(levels[-1])}): extend the sweep "
                       f"{'upward' if upward else 'downward'} (e.g. {nxt:g}).")
        return out

    def _phase1(self) -> list[str]:
        v = self.verdict
        reasons = []
        pre = self.exp.preflight
        if pre is not None and not pre.get("passed", True):
            reasons.append("the preflight failed")
        bad = [r.run_id for r in self.exp.runs if r.status in ("failed", "over_budget")]
        if bad:
            reasons.append(f"{len(bad)} runs failed or went over budget")
        unfinished = [r for r in self.exp.runs if r.status in ("pending", "running", "interrupted")]
        if unfinished:
            reasons.append(f"{len(unfinished)} runs have not finished")
        if v.overall == "supported" and not reasons:
            caveats = []
            diverged = [r.run_id for r in self.exp.runs if r.status == "diverged"]
            if diverged:
                caveats.append(f"{len(diverged)} run{'s' if len(diverged) > 1 else ''} diverged "
                               f"({', '.join(diverged)})")
            if self._under:
                caveats.append(f"{', '.join(self._under)} still improving at the end")
            return [f"Moves to Phase-1: {v.reason}"
                    + (f"; carry these caveats along: {'; '.join(caveats)}." if caveats else
                       "; every run completed its budget.")]
        if v.overall == "refuted":
            reasons.insert(0, f"the hypothesis was refuted ({v.reason}): revise the mechanism "
                              "or the prediction before scaling up")
        elif v.overall == "inconclusive":
            need = [c.seeds_needed for c in v.checks if c.seeds_needed]
            reasons.insert(0, f"the verdict is inconclusive ({v.reason})"
                           + (f": rerun with about {max(need)} seeds per arm" if need else ""))
        return ["Requires refinement: " + "; ".join(reasons) + "."]

    # -- overfit sanity and systems addendum ----------------------------------------------------

    @staticmethod
    def _preflight_why(c: Mapping[str, Any]) -> str:
        why = []
        final, threshold = c.get("final_loss"), c.get("threshold")
        if final is None or threshold is None or not (final < threshold):
            why.append(f"final loss {sig(final)} not below {sig(threshold)}")
        if c.get("nan"):
            why.append("NaN loss")
        if c.get("grads_finite") is False:
            why.append("non-finite gradients")
        return ", ".join(why) or "failed"

    def preflight(self) -> dict[str, Any]:
        pre = self.exp.preflight
        if pre is None:
            enabled = self.spec.preflight.enabled if self.spec else None
            why = ("disabled in the spec (preflight.enabled: false)" if enabled is False else
                   "not run or skipped: no preflight result in the store")
            return {"ran": False, "note": f"Preflight {why}.", "items": [], "criteria": [],
                    "result": [Item(UNCHECKED, "Pass"), Item(UNCHECKED, "Fail")], "table": None,
                    "figure": None}
        configs = pre.get("configs", [])
        corpus = next((p.get("corpus") for p in self.provs if p.get("corpus")), None)

        def common(key: str) -> str:
            vals = sorted({str(c.get(key)) for c in configs if c.get(key) is not None})
            return ", ".join(vals) if vals else NA

        slice_text = (f"the first {common('sequences')} training windows of {common('seq_len')} "
                      f"tokens" + (f" of {corpus}" if corpus else ""))
        n = len(configs)
        below = sum(1 for c in configs if c.get("final_loss") is not None
                    and c.get("threshold") is not None and c["final_loss"] < c["threshold"])
        no_nan = sum(1 for c in configs if not c.get("nan"))
        finite = sum(1 for c in configs if c.get("grads_finite", True))
        passed = bool(pre.get("passed"))
        rows = []
        for c in configs:
            ok = bool(c.get("passed"))
            rows.append([str(c.get("key")), ", ".join(c.get("arms", [])), sig(c.get("lr")),
                         str(c.get("batch_size")), str(c.get("steps")),
                         f"{sig(c.get('initial_loss'))} → {sig(c.get('final_loss'))} "
                         f"(threshold {sig(c.get('threshold'))})",
                         "yes" if not c.get("nan") else "NO", "yes" if c.get("grads_finite", True)
                         else "NO",
                         f"{CHECKED} Pass  {UNCHECKED} Fail" if ok else
                         f"{UNCHECKED} Pass  {CHECKED} Fail"])
        return {
            "ran": True,
            "note": None,
            "items": [Item("Dataset Slice", slice_text), Item("Batch Size", common("batch_size")),
                      Item("Steps Run", common("steps"))],
            "criteria": [Item("Loss → near zero", f"final loss below the threshold "
                                                  f"({common('threshold')}) in {below} of {n} "
                                                  "configurations"),
                         Item("No NaNs", f"{no_nan} of {n} configurations"),
                         Item("Gradients finite", f"{finite} of {n} configurations")],
            "result": [Item(CHECKED if passed else UNCHECKED, "Pass"),
                       Item(UNCHECKED if passed else CHECKED, "Fail")],
            "table": Table(["Config", "Arms", "LR", "Batch", "Steps", "Loss (initial → final)",
                            "No NaNs", "Grads finite", "Result"], rows,
                           ["l", "l", "r", "r", "r", "r", "l", "l", "l"]),
            "figure": self.figures.get("preflight"),
        }

    def addendum(self) -> dict[str, Any] | None:
        add = self.exp.addendum
        wanted = self.spec is not None and addendum_requested(self.spec)
        if add is None:
            if not wanted:
                return None
            return {"present": False, "note": "The spec asks for this addendum, but no systems "
                                              "analysis is stored for this experiment yet."}
        plan_runs = (self.exp.plan or {}).get("runs", [])

        def same(key: str, fmt: Any) -> str:
            vals = sorted({p.get(key) for p in plan_runs if p.get(key) is not None})
            if not vals:
                return "not recorded in the plan"
            text = " / ".join(fmt(v) for v in vals)
            return text + (" (yes)" if len(vals) == 1 else " (NO: differs between arms)")

        seeds_by_arm = {arm: tuple(sorted(r.seed for r in self.exp.runs_of(arm)))
                        for arm in self.exp.arms}
        seeds_same = len(set(seeds_by_arm.values())) <= 1
        seeds = next(iter(seeds_by_arm.values()), ())
        rows = []
        for r in add.get("rows", []):
            rows.append([str(r.get("arm")), _opt(r.get("step_time_s"), lambda x: f"{x * 1000:.1f} ms"),
                         _opt(r.get("tokens_per_s"), lambda x: integer(x)),
                         _opt(r.get("peak_mem_bytes"), mib),
                         _opt(r.get("final_val_loss"), lambda x: fixed(x, 4))])
        conclusions = add.get("conclusions") or {}
        return {
            "present": True,
            "conditions": [Item("Fixed tokens per run", same("tokens", integer)),
                           Item("Same seed", (", ".join(map(str, seeds)) + " in every arm (yes)")
                                if seeds_same else "NO: arms ran different seeds"),
                           Item("Same effective batch", same("effective_batch", integer))],
            "reference": add.get("reference"),
            "table": Table(["Config", "Step Time", "Tokens/sec", self.mem_label,
                            "Final Val Loss"], rows, ["l", "r", "r", "r", "r"]),
            "conclusions": [Item("Memory saved", str(conclusions.get("memory_saved", NA))),
                            Item("Speed change", str(conclusions.get("speed_change", NA))),
                            Item("Any training behavior difference",
                                 str(conclusions.get("behaviour", NA)))],
        }


def _opt(value: Any, fmt: Any) -> str:
    if value is None:
        return NA
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return fmt(x) if math.isfinite(x) else sig(x)
