"""Names that more than one package uses, defined once: metric names, run statuses, event kinds,
result keys and file names. Modules import them from here; none re-types them.

Every name is also what the store, ``lmlab status --json`` and the exporters show, so renaming one
is a schema change (see :mod:`lmlab.store.db`'s migrations), not a refactor.
"""

from __future__ import annotations

from enum import StrEnum

# -- files -----------------------------------------------------------------------------------------

STORE_FILE = "lmlab.sqlite"  # one per experiment directory
LOCK_FILE = "lmlab.lock"  # DIR/lmlab.lock: the lease of the one driver writing the directory
RUNS_DIR = "runs"  # DIR/runs/<run_id>/: checkpoints, the run's lease, worker log
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before, kept until the next is complete
LEASE_FILE = "lease.json"  # DIR/runs/<run_id>/lease.json: the one worker training the run


# -- run statuses ----------------------------------------------------------------------------------


class Status(StrEnum):
    """Where a run stands. ``StrEnum``: a member *is* its string, in the store and in JSON."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"  # spent its budget; the only status with final metrics
    DIVERGED = "diverged"  # a non-finite step, or the loss blew up (a nan / divergence event)
    FAILED = "failed"  # crashed: a bug or a user error met at run time
    OVER_BUDGET = "over_budget"  # peak memory above budget.max_memory_mb, or out of memory
    INTERRUPTED = "interrupted"  # stopped on request; resumes from its checkpoint


STATUSES: tuple[str, ...] = tuple(Status)
# Ended, for now (an interrupted run may resume and run again).
TERMINAL = frozenset({Status.COMPLETED, Status.DIVERGED, Status.FAILED, Status.OVER_BUDGET,
                      Status.INTERRUPTED})
# Ended for good: a rerun of the experiment does not train these again.
FINISHED = frozenset({Status.COMPLETED, Status.DIVERGED, Status.OVER_BUDGET})
# Have not ended (yet).
UNFINISHED = frozenset({Status.PENDING, Status.RUNNING, Status.INTERRUPTED})


class Role(StrEnum):
    """What a run is for. A nuisance variable (``independent.nuisance``) makes an experiment two
    phases: ``tuning`` runs sweep it per arm, ``confirmation`` runs (every seed of meta.seeds)
    run each arm at its selected value. Statistics and verdicts read confirmation runs only:
    judging on the runs a value was selected by would carry the selection's luck into them."""

    CONFIRMATION = "confirmation"
    TUNING = "tuning"


# -- events ---------------------------------------------------------------------------------------


class Event(StrEnum):
    NAN = "nan"  # non-finite loss or gradient norm, recorded before the optimizer step
    DIVERGENCE = "divergence"  # loss above divergence_factor x its early value
    SPIKE = "spike"  # loss-spike detector
    OVER_BUDGET = "over_budget"  # peak memory above budget.max_memory_mb
    OOM = "oom"  # out-of-memory error
    COMPILE_FALLBACK = "compile_fallback"  # torch.compile failed; the run went on eager
    RESUME = "resume"  # resumed from a checkpoint
    CHECKPOINT_DAMAGED = "checkpoint_damaged"  # set aside; resumed from an earlier one or afresh
    ROWS_LOST = "rows_lost"  # lmlab doctor rebuilt a damaged store without some of the run's rows
    INTERRUPTED = "interrupted"
    PREFLIGHT = "preflight"  # experiment-level: the Overfit Sanity outcome


# Events that mean the training itself went wrong (template section 6, stability metrics).
INSTABILITY_EVENTS = (Event.NAN, Event.DIVERGENCE, Event.SPIKE)
# Events a curve statistic can count in a window.
CURVE_EVENTS = tuple(str(e) for e in INSTABILITY_EVENTS)


# -- logged metrics (one store row per step and name) -------------------------------------------

TRAIN_LOSS = "train_loss"  # per step: cross-entropy, before label smoothing or z-loss
GRAD_NORM = "grad_norm"  # per step: global gradient norm before clipping
LR = "lr"  # per step: the learning rate of the first parameter group
STEP_TIME = "step_time_s"  # per log interval: training seconds per step
TOKENS_PER_S = "tokens_per_s"  # per log interval: training tokens per training second
PEAK_MEM = "peak_mem_bytes"  # per log interval: peak memory so far (CUDA allocated, or RSS)
PEAK_MEM_RESERVED = "peak_mem_reserved_bytes"  # CUDA only: the caching allocator's peak
MFU = "mfu"  # per log interval: model FLOPs/s over the device's peak (lmlab.train.mfu), when known

# The curves every run logs (besides evaluations and diagnostics): what a curve statistic reads.
LOGGED_CURVES = (TRAIN_LOSS, GRAD_NORM, LR, STEP_TIME, TOKENS_PER_S, PEAK_MEM)

# An evaluation logs ``{split prefix}_{key}`` for each key: val_loss, val_ppl, ..., test_bpb.
EVAL_KEYS = ("loss", "ppl", "bpb", "word_ppl")
VAL = "val"
TEST = "test"
VAL_LOSS = f"{VAL}_loss"


def eval_metric(split: str, key: str) -> str:
    """The logged name of one evaluation number: ``eval_metric("val", "loss") == "val_loss"``."""
    return f"{split}_{key}"


# Probe-batch diagnostics (``lmlab.train.diagnostics``): a prefix, then a block/layer/parameter.
DIAG_BLOCK_GRAD = "grad_norm/block."
DIAG_KIND_GRAD = "grad_norm/kind."
DIAG_NORM_GRAD = "norm_grad_norm/"
DIAG_UPDATE_RATIO = "update_ratio/block."
DIAG_ACT_RMS = "act_rms/block."
DIAG_ATTN_ENTROPY = "attn_entropy/layer."


DIAG_PREFIXES = (DIAG_BLOCK_GRAD, DIAG_KIND_GRAD, DIAG_NORM_GRAD, DIAG_UPDATE_RATIO, DIAG_ACT_RMS,
                 DIAG_ATTN_ENTROPY)


def logged_curve(name: str) -> bool:
    """Whether ``name`` is a curve a run can log: a core curve, an evaluation number, or a
    diagnostic (``grad_norm/block.0``)."""
    evals = {eval_metric(split, key) for split in (VAL, TEST) for key in EVAL_KEYS}
    return (name in LOGGED_CURVES or name == PEAK_MEM_RESERVED or name in evals
            or any(name.startswith(p) and len(name) > len(p) for p in DIAG_PREFIXES))


# -- per-run quantities ----------------------------------------------------------------------

# What a hypothesis check, the decision or a summary table can name about one run, and which
# direction is better. ``final_*`` and ``test_loss`` exist only for a completed run (they are
# measured at the end of the budget); ``*_events`` count events; the rest are measured through the
# run. :mod:`lmlab.analysis.records` defines how each is computed.
RUN_METRICS: dict[str, str] = {
    "final_val_loss": "lower", "final_val_ppl": "lower", "final_val_bpb": "lower",
    "final_val_word_ppl": "lower", "final_train_loss": "lower", "test_loss": "lower",
    "min_val_loss": "lower", "tokens_per_s": "higher", "peak_mem_bytes": "lower",
    "step_time_s": "lower", "divergence_events": "lower", "nan_events": "lower",
    "spike_events": "lower", "max_grad_norm": "lower",
}
# What depends on the machine a run ran on: compared only between runs of one hardware (a
# cluster may place the runs of one experiment on different GPU types).
HARDWARE_METRICS = frozenset({"tokens_per_s", "peak_mem_bytes", "step_time_s"})
END_METRICS = frozenset({"final_val_loss", "final_val_ppl", "final_val_bpb",
                         "final_val_word_ppl", "final_train_loss", "test_loss"})
# Counts of events: each seed's value is an exact observation, not a noisy estimate.
EVENT_METRICS: dict[str, str] = {"divergence_events": "divergence", "nan_events": "nan",
                                 "spike_events": "spike"}


# -- stored experiment results (``Store.put_result`` keys) -------------------------------------

RESULT_SPEC = "experiment/spec"
RESULT_PLAN = "experiment/plan"
RESULT_PREFLIGHT = "experiment/preflight"
# The sequential design of an experiment run --until-settled: its rounds and every look.
RESULT_SEQUENTIAL = "experiment/sequential"
# The cluster jobs a remote driver submitted, by a unit's first run: a restarted driver adopts them.
RESULT_JOBS = "execute/jobs"
# The tuning phase of an experiment with nuisance variables: every arm's searched points (the
# extensions included, each recorded before it runs) and, once tuning is done, each selection.
RESULT_TUNING = "experiment/tuning"
# A researcher's notes (``lmlab note``): one key per note, "note/<UTC time>-<random>", so notes
# written at once never replace each other. A run's samples (continuations of fixed prompts
# from its final model): "samples/<run_id>".
RESULT_NOTE_PREFIX = "note/"
RESULT_SAMPLES_PREFIX = "samples/"
# Each baseline file adopted from the experiment (``lmlab adopt``), by its digest: where it was
# written, the arm, whether provisional. The notebook names it beside the decision.
RESULT_ADOPTED_PREFIX = "adopted/"


# -- config paths several modules reason about ------------------------------------------------

# Differs between the runs of one arm by design: never a controlled variable, never part of an
# arm's identity.
# The seed and its parts (init, data order) are set by meta.seeds and controlled.seed_policy.
PER_SEED_PATHS = frozenset({"train.seed", "train.init_seed", "train.data_seed"})
# The learning rates (AdamW's and Muon's matrices'): the decision's "Selected LR", and what a
# nuisance sweep's sensitivity and scaling analyses treat as the learning rate.
LR_PATHS = ("optimizer.lr", "optimizer.muon_lr")
# The effective batch (sequences per optimizer step) and its ramp. The Memory / Systems addendum
# compares arms at one effective batch; train.grad_accum may change (micro-batch x accumulation).
EFFECTIVE_BATCH_PATHS = ("train.batch_size", "train.batch_size_start", "train.batch_ramp_steps")
