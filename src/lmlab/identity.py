"""What makes two runs the same: one table of which config fields each kind of identity ignores.

Every identity lmlab uses derives from :func:`identity`:

- ``run``: every field. Two runs with one ``config_hash`` are the same run: a checkpoint resumes
  only its own run, and an experiment directory refuses a spec that would change a stored run.
- ``trajectory``: what is trained (data, tokenizer, model, optimisation, seed, budget), not how
  it is watched (evaluation, diagnostics, log and checkpoint cadence): runs that agree here
  produce the same training curve.
- ``arm``: the trajectory up to the seed and its parts (``names.PER_SEED_PATHS``). Two arms
  with one ``arm`` identity are an A/A pair.
- ``preflight``: the Overfit Sanity check trains the model/optimiser/precision of a
  configuration on a fixed slice, whatever its budget or evaluation.
- ``cost``: what a training step costs: the trajectory without the values that only change the
  numbers (learning rates, betas, decay, schedule, clip, init scale, seed) and without the
  budget. The plan times one probe run per cost identity.
- ``shape``: what a packed run's members must share (``lmlab.train.pack``): every tensor shape
  and kernel of the forward and backward pass. Ignored: the numbers (as for ``cost``), each
  member's own optimizer and schedule (a member steps its own optimizer over its own weights),
  dropout rates, loss terms and EMA (each member applies its own), and the budget and
  evaluation (a member that finishes first leaves the pack). Runs with one shape identity and
  nothing ``lmlab.train.pack.unpackable`` objects to can train as one stacked model.

``run_id(arm, seed)`` names a run, everywhere; ``tuning_run_id(arm, point, seed)`` a tuning run
of a nuisance sweep (``independent.nuisance``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from lmlab.config import RunConfig, flatten
from lmlab.names import PER_SEED_PATHS

Aspect = Literal["run", "trajectory", "arm", "preflight", "cost", "shape"]

# Values that change the numbers a step computes, never its shapes, kernels or cost.
NUMERIC_ONLY = ("optimizer.lr", "optimizer.muon_lr", "optimizer.betas", "optimizer.eps",
                "optimizer.weight_decay", "optimizer.momentum", "optimizer.embedding_lr_mult",
                "optimizer.head_lr_mult", "schedule", "train.grad_clip", "model.init_std",
                "model.scaled_init", *sorted(PER_SEED_PATHS))
WATCHING = ("evaluation", "cadence")  # how a run is observed, not what it trains
# What each member of a packed run applies on its own, whatever its packmates do.
PER_MEMBER = ("optimizer", "schedule", "model.dropout", "train.label_smoothing", "train.z_loss",
              "train.ema_decay", "train.nonfinite_check")

IGNORED: dict[str, tuple[str, ...]] = {
    "run": (),
    "trajectory": WATCHING,
    "arm": (*WATCHING, *sorted(PER_SEED_PATHS)),
    "preflight": ("budget", *WATCHING),
    # The evaluation split size and batch, and the diagnostics, do cost time; their cadences are
    # counted by the estimate itself.
    # Samples are generated after a run ends, outside its timed training.
    "cost": (*NUMERIC_ONLY, "budget", "evaluation.every_tokens", "evaluation.every_steps",
             "evaluation.every_seconds", "evaluation.samples"),
    "shape": (*NUMERIC_ONLY, *PER_MEMBER, "budget", *WATCHING),
}


def _ignored(path: str, patterns: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in patterns)


def _tree(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, RunConfig):
        return cfg.model_dump(mode="json")
    # A stored tree: validate it, so an old shape or a field added since reads as today's.
    return RunConfig.model_validate(dict(cfg)).model_dump(mode="json")


def identity(cfg: RunConfig | Mapping[str, Any], aspect: Aspect = "run") -> dict[str, Any]:
    """The flattened fields that define ``cfg`` under ``aspect``."""
    patterns = IGNORED[aspect]
    return {p: v for p, v in flatten(_tree(cfg)).items() if not _ignored(p, patterns)}


def digest(cfg: RunConfig | Mapping[str, Any], aspect: Aspect = "run") -> str:
    """A short stable hash of :func:`identity` (``aspect="run"``: the config hash)."""
    text = json.dumps(identity(cfg, aspect), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def same(a: RunConfig | Mapping[str, Any], b: RunConfig | Mapping[str, Any],
         aspect: Aspect = "run") -> bool:
    return identity(a, aspect) == identity(b, aspect)


def run_id(arm: str, seed: int) -> str:
    """The id of seed ``seed`` of arm ``arm`` (``lmlab train`` uses the config file's name)."""
    return f"{arm}-s{seed}"


def tuning_run_id(arm: str, point: Mapping[str, Any], seed: int) -> str:
    """The id of a tuning run: seed ``seed`` of arm ``arm`` at the nuisance values ``point``
    (``b8~lr=0.001-s1000``). ``~`` marks the tuning role; the rest stays file-name safe."""
    values = "_".join(f"{p.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else
                      f"{p.rsplit('.', 1)[-1]}={v}" for p, v in point.items())
    return f"{arm}~{re.sub(r'[^A-Za-z0-9_.=+-]', '-', values)}-s{seed}"


# -- lmlab 0.1 -----------------------------------------------------------------------------------

# The sections and fields of lmlab 0.1's RunConfig, whose checkpoints carry only the hash of that
# tree: a run interrupted under 0.1 resumes when its config, in 0.1's shape, hashes the same.
_V1_FIELDS = {
    "data": ("dataset", "name", "path"),
    "tokenizer": ("kind", "path", "vocab_size"),
    "model": ("activation", "attention", "bias", "d_ff", "d_model", "dropout", "init_std",
              "max_seq_len", "n_head", "n_layer", "norm", "norm_position", "positions",
              "rope_theta", "scaled_init", "sdpa_backend", "tie_embeddings"),
    "optimizer": ("betas", "decay_embeddings", "decay_norms_and_biases", "embedding_lr_mult",
                  "eps", "head_lr_mult", "impl", "lr", "momentum", "muon_lr", "muon_ns_steps",
                  "name", "nesterov", "weight_decay"),
    "schedule": ("decay_frac", "min_lr_ratio", "name", "warmup_frac", "warmup_steps"),
    "train": ("activation_checkpointing", "batch_ramp_steps", "batch_size", "batch_size_start",
              "compile", "device", "ema_decay", "grad_accum", "grad_clip", "init_from",
              "label_smoothing", "precision", "seed", "seq_len", "seq_len_start",
              "seq_len_warmup_steps", "tf32", "z_loss"),
    "budget": ("max_memory_mb", "steps", "tokens", "wall_clock_s"),
    "eval": ("batch_size", "checkpoint_every_steps", "every_seconds", "every_steps",
             "every_tokens", "log_every_steps", "max_batches", "test_at_end"),
    "diagnostics": ("activation_norms", "attention_entropy", "divergence_factor", "every_steps",
                    "layer_grad_norms", "norm_grad_norms", "spike_threshold", "spike_warmup",
                    "spike_window", "update_ratio"),
}


def v1_config_hash(cfg: RunConfig) -> str | None:
    """The hash lmlab 0.1 gave this config, or None when it sets something 0.1 did not have."""
    tree = cfg.model_dump(mode="json")
    evaluation = dict(tree.pop("evaluation"))
    tree["diagnostics"] = evaluation.pop("diagnostics")
    evaluation.pop("samples")  # generated after the run ends: they change nothing 0.1 trained
    tree["eval"] = {**evaluation, **tree.pop("cadence")}
    defaults = RunConfig().model_dump(mode="json")
    defaults["evaluation"].pop("samples")
    defaults["eval"] = {**defaults["evaluation"], **defaults["cadence"]}
    defaults["diagnostics"] = defaults["eval"].pop("diagnostics")
    old: dict[str, Any] = {}
    for section, fields in _V1_FIELDS.items():
        values = tree.get(section, {})
        extra = set(values) - set(fields)
        # A field added after 0.1 at its default value is what 0.1 ran; any other value is not.
        if any(values[k] != defaults[section].get(k) for k in extra):
            return None
        old[section] = {k: values[k] for k in fields}
    text = json.dumps(old, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
