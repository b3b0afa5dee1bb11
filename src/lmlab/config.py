"""The typed config tree of one training run.

Every component has one pydantic model here and a ``build`` function in its own package
(``lmlab.data``, ``lmlab.model``, ``lmlab.optim``, ``lmlab.train``). A ``RunConfig`` is the whole
tree for one (arm, seed); the experiment spec (``lmlab.spec``) produces one per run and its
``controlled`` section is written in exactly these field names, so a dotted path such as
``optimizer.lr`` or ``train.batch_size`` means the same thing in a spec, a config file, the store
and a report.

The configs live in one module (rather than one per component, as in torchtitan) because the
spec's frozen-control check and the report both walk the tree as a whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def about(fields: tuple[str, ...], message: str) -> PydanticCustomError:
    """A validation error of a check across fields, naming them (relative to the model that
    checks): whoever reports it can point at the line of the one that was written."""
    return PydanticCustomError("fields", message.replace("{", "{{").replace("}", "}}"),
                               {"fields": fields})


def error_fields(error: Mapping[str, Any]) -> list[str]:
    """The dotted fields a pydantic error is about: those :func:`about` named, else its
    location."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    named = (error.get("ctx") or {}).get("fields") or ()
    return [f"{loc}.{f}" if loc else f for f in named] or ([loc] if loc else [])


class _Config(BaseModel):
    """Strict base: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Config):
    """Which corpus. ``wikitext-2-raw-v1`` is the real thing (sha256-verified, downloaded if
    absent); ``local`` is a user's own train/valid/test text files, recorded under ``name``."""

    dataset: Literal["wikitext-2-raw-v1", "local"] = "wikitext-2-raw-v1"
    # wikitext: a directory holding wiki.{train,valid,test}.raw (skips the search order).
    # local: a directory holding {train,valid,test}.txt (or wiki.*.raw). ``$VARS`` and ``~`` expand.
    path: str | None = None
    # Label of a local corpus in every record and report (default: the directory's name).
    name: str | None = None

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataConfig:
        if self.dataset == "local" and not self.path:
            raise ValueError("dataset 'local' needs a path to a directory with train/valid/test text")
        return self


GPT2_VOCAB_SIZE = 50257  # OpenAI's GPT-2 BPE (encoder.json)
BYTE_VOCAB_SIZE = 256


class TokenizerConfig(_Config):
    kind: Literal["bpe", "gpt2", "byte"] = "bpe"
    vocab_size: int = Field(8192, ge=260, description="bpe only: size of the trained vocabulary")
    # gpt2 only: a directory with encoder.json + vocab.bpe (skips the search order).
    path: str | None = None

    @property
    def planned_vocab_size(self) -> int:
        """The vocabulary this config asks for, known before any tokenizer exists (a BPE trained
        on a small corpus can come out smaller, never larger)."""
        return {"bpe": self.vocab_size, "gpt2": GPT2_VOCAB_SIZE, "byte": BYTE_VOCAB_SIZE}[self.kind]


class ModelConfig(_Config):
    """A GPT-2 style decoder-only transformer and the knobs architecture experiments turn."""

    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8)
    d_ff: int | None = Field(None, description="MLP hidden width; default 4*d_model (gelu) or "
                             "the 8/3*d_model rounded to 64 (swiglu)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    tie_embeddings: bool = True
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    activation: Literal["gelu", "swiglu"] = "gelu"
    attention: Literal["sdpa", "manual"] = "sdpa"
    # On CUDA, pin an SDPA backend; "auto" lets PyTorch choose.
    sdpa_backend: Literal["auto", "flash", "efficient", "math"] = "auto"
    init_std: float = Field(0.02, gt=0)
    scaled_init: bool = Field(True, description="GPT-2: residual projections std / sqrt(2*n_layer)")
    # Longest sequence the position table holds; default: the training seq_len.
    max_seq_len: int | None = None

    @property
    def mlp_width(self) -> int:
        """The MLP hidden width: ``d_ff`` when set, else 4·d_model (gelu) or, for SwiGLU,
        8/3·d_model rounded up to a multiple of 64, which keeps its three matrices at the
        parameter count of the GELU MLP's two (Shazeer 2020) and the width friendly to matmul
        tiling."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise about(("d_model", "n_head"),
                        f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise about(("d_model", "n_head"), "rope needs an even head dimension")
        return self


class OptimizerConfig(_Config):
    name: Literal["adamw", "sgd", "lion", "muon", "adafactor"] = "adamw"
    lr: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = Field(0.1, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and muon")
    nesterov: bool = True
    # "auto": fused where the device supports it, else foreach.
    impl: Literal["auto", "fused", "foreach", "plain"] = "auto"
    # Parameter grouping, applied the same way for every optimizer.
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    embedding_lr_mult: float = Field(1.0, gt=0)
    head_lr_mult: float = Field(1.0, gt=0)
    # Muon: lr of the orthogonalised 2-D weights (the rest uses ``lr`` with AdamW).
    muon_lr: float = Field(0.02, gt=0)
    muon_ns_steps: int = Field(5, ge=1)


class ScheduleConfig(_Config):
    name: Literal["constant", "cosine", "linear", "wsd", "inverse_sqrt"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    # A fraction of the run; when set it wins over warmup_steps (the same share for every arm).
    warmup_frac: float | None = Field(None, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor, as a fraction of the peak lr")
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: the final share spent decaying")


# Optimizers whose update of a weight needs the whole matrix, not a shard of its rows (FSDP).
WHOLE_MATRIX_OPTIMIZERS = {"muon": "Muon orthogonalises each whole matrix",
                           "adafactor": "Adafactor factors each matrix into row and column "
                                        "statistics"}


class DistributedConfig(_Config):
    """One run over several devices of one node (``lmlab.train.distributed``): ``nproc`` ranks
    launched with torchrun (gloo on CPU, NCCL on CUDA). The global batch (``train.batch_size``)
    stays the controlled quantity: each rank trains ``batch_size / nproc`` sequences of every
    step, in micro-batches of at most ``batch_size / grad_accum``.

    ``strategy``: ``ddp`` replicates the model on every rank and averages the gradients;
    ``fsdp`` (FSDP2, ``fully_shard`` per block and on the whole model) shards the weights, the
    gradients and the optimizer state over the ranks, for a model whose training state does not
    fit one device. The update is the same either way, up to float summation order."""

    nproc: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _sharding_needs_ranks(self) -> DistributedConfig:
        if self.strategy == "fsdp" and self.nproc < 2:
            raise ValueError("strategy 'fsdp' shards the model over the ranks: it needs "
                             "distributed.nproc of 2 or more")
        return self


class TrainConfig(_Config):
    # The run's seed. It fixes every random number of the run unless one of the parts below
    # overrides it (an experiment's ``controlled.seed_policy`` sets them).
    seed: int = 0
    # The weights' initialisation and dropout draw from this seed (None: ``seed``).
    init_seed: int | None = None
    # The order of the training windows is drawn from this seed (None: ``seed``). Holding it
    # fixed across seeds isolates initialisation noise, as the PolyPythia seed studies do.
    data_seed: int | None = None
    # Sequences per optimizer step (the effective batch); split into grad_accum micro-batches.
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=2)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True
    # torch.compile's mode ("reduce-overhead": CUDA graphs, for small launch-bound models); the
    # eager model is the fallback when compiling fails (a compile_fallback event).
    compile: Literal["off", "default", "reduce-overhead", "max-autotune",
                     "max-autotune-no-cudagraphs"] = "off"
    # How a non-finite step is kept from being applied (lmlab.train.step): "host" reads the
    # flag every step; "device" lets torch's fused AdamW/SGD skip it on the device and reads the
    # flags at the log interval; "auto": "device" on CUDA where the optimizer can.
    nonfinite_check: Literal["auto", "host", "device"] = "auto"
    # 0: none; 1: every block; k: every k-th block.
    activation_checkpointing: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    z_loss: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Exponential moving average of the weights, used for evaluation when set.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Short sequences first: seq_len ramps linearly from seq_len_start over seq_len_warmup_steps.
    seq_len_warmup_steps: int = Field(0, ge=0)
    seq_len_start: int = Field(64, ge=2)
    # Batch-size ramp: batch_size ramps linearly from batch_size_start over batch_ramp_steps.
    batch_ramp_steps: int = Field(0, ge=0)
    batch_size_start: int = Field(1, ge=1)
    # Start from pretrained GPT-2 weights: a directory with a HF GPT2LMHeadModel, or a hub id.
    init_from: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _accum_divides(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        n = self.distributed.nproc
        if n > 1 and self.batch_size % n:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                             f"distributed.nproc={n}: every rank trains an equal share of it")
        if n > 1 and self.batch_ramp_steps:
            raise ValueError("a batch-size ramp cannot be split over distributed.nproc ranks")
        return self

    @property
    def init_seed_used(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def data_seed_used(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def seq_len_at(self, step: int) -> int:
        return _ramp(step, self.seq_len_warmup_steps, self.seq_len_start, self.seq_len)

    def batch_size_at(self, step: int) -> int:
        return _ramp(step, self.batch_ramp_steps, self.batch_size_start, self.batch_size)

    def tokens_after(self, steps: int) -> int:
        """Tokens seen after ``steps`` optimizer steps, following the ramps."""
        ramp_steps = min(steps, max(self.seq_len_warmup_steps, self.batch_ramp_steps))
        ramped = sum(self.seq_len_at(s) * self.batch_size_at(s) for s in range(ramp_steps))
        return ramped + (steps - ramp_steps) * self.tokens_per_step

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def _ramp(step: int, ramp_steps: int, start: int, end: int) -> int:
    """Linear ramp from ``start`` to ``end`` over ``ramp_steps`` steps (then ``end``)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    return max(1, min(end, round(start + (end - start) * step / ramp_steps)))


class BudgetConfig(_Config):
    """How long one run trains. The first limit reached ends it; the spec's comparison axis
    decides which one is binding for an experiment."""

    tokens: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    wall_clock_s: float | None = Field(None, gt=0, description="training seconds, evaluation excluded")
    max_memory_mb: float | None = Field(None, gt=0, description="peak memory allowed (CUDA "
                                        "allocated, or the process's peak RSS on CPU)")

    def progress(self, step: int, tokens: int, train_s: float) -> float:
        """The fraction of the run done, on whichever limit binds first (1.0 = over)."""
        fractions = [done / limit for done, limit in
                     ((step, self.steps), (tokens, self.tokens), (train_s, self.wall_clock_s))
                     if limit]
        return min(max(fractions), 1.0)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.tokens is None and self.steps is None and self.wall_clock_s is None:
            raise ValueError("a budget needs at least one of tokens, steps, wall_clock_s")
        return self


class DiagnosticsConfig(_Config):
    """Stability detectors (always on) and optional diagnostics run on a fixed probe batch."""

    every_steps: int = Field(50, ge=1, description="cadence of the probe-batch diagnostics")
    layer_grad_norms: bool = True
    norm_grad_norms: bool = True
    activation_norms: bool = True
    attention_entropy: bool = True
    update_ratio: bool = True
    # Loss-spike detector: a loss above mean + threshold*std of the previous `window` losses.
    spike_window: int = Field(50, ge=5)
    spike_warmup: int = Field(50, ge=0)
    spike_threshold: float = Field(6.0, gt=0)
    # Divergence: loss above this multiple of its early (first log interval) value.
    divergence_factor: float = Field(3.0, gt=1)

    @property
    def any_probe(self) -> bool:
        return (self.layer_grad_norms or self.norm_grad_norms or self.activation_norms
                or self.attention_entropy or self.update_ratio)


# Fixed prompts the final model of every run continues (WikiText-2's own register: encyclopedic
# openings), the same in every run, so arms are compared on the same text.
DEFAULT_PROMPTS = ("The history of the city", "In 1998 , the band", "The species is found in")


class SamplesConfig(_Config):
    """Continuations of fixed prompts from a run's final model, generated after the run
    completes (never in the training loop) with a fixed decoding seed, and stored with it.
    ``prompts: []`` turns them off. ``temperature: 0`` decodes greedily."""

    prompts: list[str] = list(DEFAULT_PROMPTS)
    max_new_tokens: int = Field(48, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, ge=1, description="None: the whole vocabulary")
    seed: int = 0


class EvaluationConfig(_Config):
    """How a run is evaluated (template section 5's evaluation protocol) and what it logs besides
    the core metrics (section 6's diagnostics)."""

    # Cadence on the validation split: the first that is set is used (default: ten evaluations).
    every_tokens: int | None = Field(None, gt=0)
    every_steps: int | None = Field(None, gt=0)
    every_seconds: float | None = Field(None, gt=0)
    # None: the FULL split in non-overlapping windows. A number caps the periodic evaluations
    # (cheaper curves); the final validation and the test evaluation always use the full split.
    max_batches: int | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    test_at_end: bool = True
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    samples: SamplesConfig = SamplesConfig()


class CadenceConfig(_Config):
    """How often a run writes what it has: metric rows (one store transaction per interval, and
    the interval over which step time and tokens/sec are measured) and checkpoints."""

    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_steps: int = Field(200, ge=1)


class Components(_Config):
    """What builds a run: the sections an experiment spec freezes (its ``controlled``) and whose
    fields its arms may vary."""

    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()


class RunConfig(Components):
    """Everything one training run needs. Its sections are named as a spec names them, so a
    dotted path (``evaluation.diagnostics.every_steps``) means the same field everywhere.
    :mod:`lmlab.identity` says which fields make a run what it is."""

    budget: BudgetConfig = BudgetConfig(steps=100)
    evaluation: EvaluationConfig = EvaluationConfig()
    cadence: CadenceConfig = CadenceConfig()

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        return upgrade_run_tree(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _positions_cover_seq_len(self) -> RunConfig:
        if self.model.max_seq_len is not None and self.model.max_seq_len < self.train.seq_len:
            raise about(("model.max_seq_len", "train.seq_len"),
                        f"model.max_seq_len={self.model.max_seq_len} is shorter than "
                        f"train.seq_len={self.train.seq_len}")
        return self

    @model_validator(mode="after")
    def _shards_suit_the_optimizer(self) -> RunConfig:
        why = WHOLE_MATRIX_OPTIMIZERS.get(self.optimizer.name)
        if self.train.distributed.strategy == "fsdp" and why:
            raise about(("train.distributed.strategy", "optimizer.name"),
                        f"strategy 'fsdp' shards every matrix over the ranks, but {why}: use "
                        "strategy 'ddp' for this optimizer")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @property
    def config_hash(self) -> str:
        from lmlab.identity import digest

        return digest(self)


# lmlab 0.1 named two sections differently: ``eval`` (which also held the log and checkpoint
# cadences) and a top-level ``diagnostics``. Trees of that shape (old stores, old config files)
# are moved to today's sections on the way in.
LEGACY_CADENCE_KEYS = ("log_every_steps", "checkpoint_every_steps")


def upgrade_run_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A RunConfig tree in lmlab 0.1's shape, moved to today's sections (a copy; a tree already
    in today's shape is returned as it is)."""
    if "eval" not in tree and "diagnostics" not in tree:
        return tree
    tree = dict(tree)
    evaluation = dict(tree.pop("eval", None) or {})
    cadence = dict(tree.get("cadence") or {})
    for key in LEGACY_CADENCE_KEYS:
        if key in evaluation:
            cadence[key] = evaluation.pop(key)
    if "diagnostics" in tree:
        evaluation["diagnostics"] = tree.pop("diagnostics")
    tree["evaluation"] = {**evaluation, **(tree.get("evaluation") or {})}
    if cadence:
        tree["cadence"] = cadence
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted paths, the way specs and reports name variables."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def set_path(tree: dict[str, Any], path: str, value: Any, *, create: bool = False) -> None:
    """Set the dotted ``path`` of ``tree`` to ``value``. The mappings on the way must exist
    (a KeyError names the first that does not) unless ``create`` makes the missing ones."""
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {}) if create else node[key]
    node[leaf] = value


def expand_path(path: str, base: Path | None = None) -> Path:
    """``$VARS`` and ``~`` expanded; a relative path is taken from ``base`` (a spec's folder)."""
    import os

    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and base is not None:
        p = base / p
    return p
