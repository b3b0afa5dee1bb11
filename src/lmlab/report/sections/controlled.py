"""Section 3, Controlled Variables (Frozen): what every run shared, as the runs resolved it
(their configs and provenance), with "varied" where an arm sets it; and a warning for any setting
that differs between runs without being declared independent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np

from lmlab.config import flatten
from lmlab.names import PER_SEED_PATHS
from lmlab.report.format import NA, Item, fmt_value, integer
from lmlab.report.inputs import ReportInputs
from lmlab.store import hardware_summary

VARIED = "varied (see 4)"
TOKENIZERS = {"bpe": "BPE trained on the training split", "gpt2": "GPT-2 BPE", "byte": "bytes"}
MODEL_SETTINGS = (
    ("n_layer", "model.n_layer"), ("d_model", "model.d_model"), ("n_head", "model.n_head"),
    ("d_ff", "model.d_ff"), ("activation", "model.activation"), ("norm", "model.norm"),
    ("norm position", "model.norm_position"), ("positions", "model.positions"),
    ("attention", "model.attention"), ("bias", "model.bias"),
    ("tied embeddings", "model.tie_embeddings"), ("init std", "model.init_std"),
    ("scaled init", "model.scaled_init"))


@dataclass(frozen=True)
class Controlled:
    items: list[Item]
    warnings: list[str]


def setting(inputs: ReportInputs, path: str) -> str:
    """One resolved setting: its value in every run, or "varied" when it is an arm's."""
    return VARIED if path in inputs.varied else fmt_value(inputs.flat.get(path))


def _settings(inputs: ReportInputs, paths: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{label} {setting(inputs, path)}" for label, path in paths)


def section(inputs: ReportInputs) -> Controlled:
    v = partial(setting, inputs)
    precision = _settings(inputs, [
        ("", "train.precision"), ("tf32", "train.tf32"), ("torch.compile", "train.compile"),
        ("activation checkpointing", "train.activation_checkpointing")])
    items = [
        Item("Dataset", _dataset(inputs)),
        Item("Tokenizer config", _tokenizer(inputs)),
        Item("Model config (layers, d_model, heads, etc)", _model(inputs)),
        Item("Sequence length", _seq_len(inputs)),
        Item("Effective tokens per run", _tokens_per_run(inputs)),
        Item("Optimizer (unless this is the optimizer experiment)", _optimizer(inputs)),
        Item("Weight decay", f"{v('optimizer.weight_decay')} (applied to norms and biases: "
                             f"{v('optimizer.decay_norms_and_biases')}; to embeddings: "
                             f"{v('optimizer.decay_embeddings')})"),
        Item("Dropout", v("model.dropout")),
        Item("Scheduler shape", _schedule(inputs)),
        Item("Mixed precision setting", precision.strip()),
        Item("Hardware (GPU type)", _hardware(inputs)),
        Item("Seed policy", _seed_policy(inputs)),
    ]
    if (inherited := _inherited(inputs)) is not None:
        items.insert(0, Item("Baseline", inherited))
    return Controlled(items, _undeclared(inputs))


def _inherited(inputs: ReportInputs) -> str | None:
    """Which of the settings below came from the baseline and which the spec overrode."""
    b = (inputs.exp.spec_record or {}).get("baseline")
    if not b:
        return None
    o = b.get("origin") or {}
    over = b.get("overridden") or {}
    text = (f"these settings extend the baseline {b.get('path')} (arm {o.get('arm', '?')} of "
            f"{o.get('experiment', '?')}, verdict {o.get('verdict', '?')}"
            + (", provisional" if b.get("provisional") else "") + f"; see 0): "
            f"{b.get('inherited', 0)} inherited")
    if over:
        text += "; overridden here: " + "; ".join(
            f"{p} = {fmt_value(new)}" + (f" (baseline {fmt_value(old)})" if old != new else
                                         " (as in the baseline)")
            for p, (old, new) in over.items())
    else:
        text += ", none overridden"
    return text


def _undeclared(inputs: ReportInputs) -> list[str]:
    """Settings that differ between runs without being declared independent. Budgets are
    excluded: the comparison axis resolves them per arm on purpose (equal tokens with different
    batch sizes means different step counts)."""
    undeclared = sorted(p for p in inputs.varied - inputs.declared - PER_SEED_PATHS
                        if not p.startswith("budget."))
    return [f"{p} differs between runs but is not a declared independent variable"
            for p in undeclared]


def _model(inputs: ReportInputs) -> str:
    model = _settings(inputs, MODEL_SETTINGS)
    if setting(inputs, "model.d_ff") == NA:
        model = model.replace(f"d_ff {NA}", "d_ff default (4×d_model; 8/3×d_model for swiglu)")
    n_params = sorted({int(r.summary["n_params"]) for r in inputs.exp.runs
                       if r.summary.get("n_params")})
    if n_params:
        model += "; " + (f"parameters {n_params[0]:,}" if len(n_params) == 1 else
                         f"parameters {n_params[0]:,} to {n_params[-1]:,} across arms")
    if inputs.flat.get("train.init_from") or "train.init_from" in inputs.varied:
        model += f"; initialised from {setting(inputs, 'train.init_from')}"
    return model


def _seq_len(inputs: ReportInputs) -> str:
    seq = setting(inputs, "train.seq_len")
    if inputs.flat.get("train.seq_len_warmup_steps"):
        seq += (f" (ramped from {setting(inputs, 'train.seq_len_start')} over "
                f"{setting(inputs, 'train.seq_len_warmup_steps')} steps)")
    return seq


def _optimizer(inputs: ReportInputs) -> str:
    v = partial(setting, inputs)
    opt = _settings(inputs, [("", "optimizer.name"), ("lr", "optimizer.lr"),
                             ("betas", "optimizer.betas"), ("eps", "optimizer.eps")]).strip()
    name = inputs.flat.get("optimizer.name")
    name_varied = "optimizer.name" in inputs.varied
    if name in ("sgd", "muon") or name_varied:
        opt += f", momentum {v('optimizer.momentum')}, nesterov {v('optimizer.nesterov')}"
    if name == "muon" or name_varied:
        opt += f", muon lr {v('optimizer.muon_lr')}"
    for label, path in (("embedding lr ×", "optimizer.embedding_lr_mult"),
                        ("head lr ×", "optimizer.head_lr_mult")):
        if inputs.flat.get(path) not in (None, 1.0) or path in inputs.varied:
            opt += f", {label}{v(path)}"
    opt += f"; grad clip {v('train.grad_clip')}"
    impls = sorted({str(r.summary["optimizer_impl"]) for r in inputs.exp.runs
                    if r.summary.get("optimizer_impl")})
    return opt + f"; implementation {', '.join(impls) if impls else v('optimizer.impl')}"


def _dataset(inputs: ReportInputs) -> str:
    corpora = Counter((p.get("corpus"), bool(p.get("is_wikitext2")), p.get("data_hash"))
                      for p in inputs.provenances if p.get("corpus"))
    if not corpora:
        return f"{setting(inputs, 'data.dataset')} (planned; no run has recorded its data yet)"
    parts = []
    for name, is_wt2, digest in corpora:
        label = "WikiText-2 (wikitext-2-raw-v1)" if is_wt2 else f"{name} (not WikiText-2)"
        parts.append(label + (f", data hash {str(digest)[:12]}" if digest else ""))
    text = "; ".join(parts)
    if len(corpora) > 1:
        text += " — NOT the same data in every run"
    return text


def _tokenizer(inputs: ReportInputs) -> str:
    provs = inputs.provenances
    vocabs = sorted({int(p["vocab_size"]) for p in provs if p.get("vocab_size")})
    hashes = sorted({str(p["tokenizer_hash"])[:12] for p in provs if p.get("tokenizer_hash")})
    label = TOKENIZERS.get(str(inputs.flat.get("tokenizer.kind")),
                           setting(inputs, "tokenizer.kind"))
    vocab = (", ".join(f"{v:,}" for v in vocabs) if vocabs else
             setting(inputs, "tokenizer.vocab_size") + " (configured)")
    text = f"{label}, vocabulary {vocab}"
    if hashes:
        text += f", tokenizer hash {', '.join(hashes)}"
    if len(hashes) > 1 or len(vocabs) > 1:
        text += " — NOT the same tokenizer in every run"
    return text


def _tokens_per_run(inputs: ReportInputs) -> str:
    plan_runs = (inputs.exp.plan or {}).get("runs", [])
    planned = sorted({p.get("tokens") for p in plan_runs if p.get("tokens")})
    seen = [float(r.tokens) for r in inputs.exp.runs if r.completed]
    per_step = sorted({p.get("tokens_per_step") for p in plan_runs if p.get("tokens_per_step")})
    parts = []
    if planned:
        parts.append("planned " + " / ".join(integer(t) for t in planned))
    if seen:
        lo, hi = min(seen), max(seen)
        parts.append(f"seen {integer(lo)}" if lo == hi else
                     f"seen {integer(lo)} to {integer(hi)} (mean {integer(np.mean(seen))})")
    if per_step:
        parts.append("tokens per step " + " / ".join(integer(t) for t in per_step))
    parts.append(f"batch {setting(inputs, 'train.batch_size')} sequences × seq_len "
                 f"{setting(inputs, 'train.seq_len')}, grad accumulation "
                 f"{setting(inputs, 'train.grad_accum')}")
    return "; ".join(parts)


def _schedule(inputs: ReportInputs) -> str:
    v = partial(setting, inputs)
    varied, flat = inputs.varied, inputs.flat
    text = v("schedule.name")
    if flat.get("schedule.warmup_frac") is not None or "schedule.warmup_frac" in varied:
        frac = flat.get("schedule.warmup_frac")
        text += ", warmup " + (VARIED if "schedule.warmup_frac" in varied
                               else f"{100 * frac:g}% of the run")
    elif "schedule.warmup_steps" in varied:
        text += f", warmup steps {VARIED}"
    else:
        text += f", warmup {v('schedule.warmup_steps')} steps"
    text += f", floor {v('schedule.min_lr_ratio')}× peak lr"
    if flat.get("schedule.name") == "wsd" or "schedule.name" in varied:
        text += f", decay over the last {v('schedule.decay_frac')} of the run (wsd)"
    return text


def _hardware(inputs: ReportInputs) -> str:
    lines = Counter((hardware_summary(p), str(p.get("device", "?"))) for p in inputs.provenances)
    if not lines:
        return "not captured (no run has started)"
    text = "; ".join(f"{hw}, device {dev}" + (f", {n} runs" if len(lines) > 1 else "")
                     for (hw, dev), n in lines.items())
    if len(lines) > 1:
        text += " — NOT the same hardware in every run: speed and memory are not comparable"
    if inputs.spec and inputs.spec.controlled.hardware != "any":
        text += f" (spec asks for {inputs.spec.controlled.hardware})"
    return text


def _seeds_by_arm(inputs: ReportInputs) -> dict[str, list[int]]:
    return {arm: sorted(r.seed for r in inputs.exp.runs_of(arm)) for arm in inputs.exp.arms}


def _seed_policy(inputs: ReportInputs) -> str:
    """The seeds every arm ran and what each seed fixed, as the runs recorded it (their
    ``train.init_seed`` / ``train.data_seed``), with the policy that set it."""
    by_arm = _seeds_by_arm(inputs)
    seeds = next(iter(by_arm.values()), [])
    policy = inputs.spec.controlled.seed_policy if inputs.spec else None
    if len({tuple(s) for s in by_arm.values()}) <= 1:
        text = f"every arm runs seeds {', '.join(map(str, seeds))}"
    else:
        text = "NOT the same seeds in every arm: " + "; ".join(
            f"{arm}: {', '.join(map(str, s))}" for arm, s in by_arm.items())
    if policy is not None:
        text += ("; random numbers shared across arms (seed s of every arm draws the same ones: "
                 "common random numbers)" if policy.shares_random_numbers else
                 "; random numbers drawn per arm (no two arms share them)")
    parts = []
    for label, key in (("initialisation and dropout", "train.init_seed"),
                       ("data order", "train.data_seed")):
        used = {flatten(r.config).get(key) for r in inputs.exp.runs}
        if not used or used == {None}:
            parts.append(f"{label} from the run's seed")
        elif len(used) == 1:
            parts.append(f"{label} fixed at seed {used.pop()} in every run")
        else:
            parts.append(f"{label} from a per-arm stream of the seed")
    return text + "; " + ", ".join(parts)
