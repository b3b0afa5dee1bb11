"""Impossible shapes and hostile input are refused before anything is allocated or expanded.

The memory estimate comes from the config alone, so it is held to the real thing here: the
parameter layout (names, shapes, kinds) of every architecture knob against built models, the
optimizer state against each optimizer after a step, and the activations against what autograd
actually saves. Then what it is for: shapes that cannot fit are refused at validate time with the
estimate, the file, the line and the field; binary files, alias bombs and deep nesting are
refused by the loader; the max_seq_len error points at the field that is wrong.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import yaml

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.execute.experiment import estimate as estimate_wall_clock
from lmlab.execute.experiment import prepare_plan_data
from lmlab.execute.local import run_single
from lmlab.model import build_model
from lmlab.optim import optimizer_state_bytes
from lmlab.spec.expand import load_plan
from lmlab.spec.footprint import (
    activation_bytes,
    layout,
    parameters,
)
from lmlab.spec.footprint import (
    optimizer_state_bytes as estimated_state_bytes,
)
from lmlab.spec.load import MAX_VALUES, load_yaml, upgrade_run_doc, validate
from lmlab.train.loss import linear_cross_entropy
from lmlab.train.step import build_learner, train_step
from test_spec import base_spec, line_of, refused, write

KNOBS = {"activation": ["gelu", "swiglu"], "bias": [True, False],
         "tie_embeddings": [True, False], "norm": ["layernorm", "rmsnorm"],
         "norm_position": ["pre", "post"], "positions": ["learned", "rope"]}


def lmlab(*args: object) -> subprocess.CompletedProcess:
    # The timeout only guards against a hang (an unbounded alias expansion ran for minutes).
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# ---- the estimate against real models ------------------------------------------------------

@pytest.mark.parametrize("knobs", [dict(zip(KNOBS, c, strict=True))
                                   for c in itertools.product(*KNOBS.values())])
def test_parameter_layout_is_the_built_models(knobs):
    for extra in ({}, {"d_ff": 40, "max_seq_len": 24, "n_layer": 3}):
        cfg = RunConfig.model_validate({"model": {"n_layer": 2, "n_head": 2, "d_model": 16,
                                                  **knobs, **extra}, "train": {"seq_len": 8}})
        model = build_model(cfg.model, 97, cfg.train.seq_len)
        mine = parameters(cfg.model, 97, cfg.train.seq_len)
        assert {p.name: p.shape for p in mine} == \
            {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert {p.name: p.kind for p in mine} == model.param_kinds()
        assert layout(cfg.model, 97, 8).numel == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, momentum", [("adamw", 0.9), ("sgd", 0.9), ("sgd", 0.0),
                                            ("lion", 0.9), ("muon", 0.9), ("adafactor", 0.9)])
def test_optimizer_state_is_what_each_optimizer_keeps(name, momentum):
    cfg = RunConfig.model_validate({
        "model": {"n_layer": 2, "n_head": 2, "d_model": 16, "tie_embeddings": False},
        "train": {"seq_len": 8, "batch_size": 2},
        "optimizer": {"name": name, "momentum": momentum, "nesterov": momentum > 0}})
    learner = build_learner(cfg, 97, torch.device("cpu"))
    x = torch.randint(0, 97, (2, 8))
    assert train_step(learner, [(x, x, 1.0)]).finite
    assert estimated_state_bytes(cfg, layout(cfg.model, 97, 8)) == \
        optimizer_state_bytes(learner.optimizer)


def _saved_bytes(fn, exclude: set[int]) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (each storage once,
    parameters and ``exclude`` left out)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _measured_activations(cfg: RunConfig, vocab: int) -> tuple[int, int]:
    """(what one micro-batch's forward and loss keep for backward, as the training step computes
    them: the hidden states into the fused head and loss; what one block's forward alone keeps)."""
    learner = build_learner(cfg, vocab, torch.device("cpu"))
    params = {p.untyped_storage().data_ptr() for p in learner.raw.parameters()}
    x = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.train.seq_len))

    def forward() -> torch.Tensor:
        with learner.autocast():
            hidden = learner.forward(x)
            _, objective = linear_cross_entropy(hidden.flatten(0, 1)[None], learner.head[None],
                                                x.flatten()[None])
        return objective

    saved, _ = _saved_bytes(forward, params)
    block = learner.raw.blocks[0]
    h = torch.randn(*x.shape, cfg.model.d_model, requires_grad=True)
    with learner.autocast():
        one_block, _ = _saved_bytes(lambda: type(block).forward(block, h),
                                    params | {h.untyped_storage().data_ptr()})
    return saved, one_block


@pytest.mark.parametrize("variant", [
    {}, {"model": {"activation": "swiglu"}}, {"model": {"attention": "manual"}},
    {"model": {"positions": "rope"}}, {"model": {"norm": "rmsnorm", "bias": False}},
    {"model": {"norm_position": "post"}}, {"model": {"tie_embeddings": False, "d_ff": 100}},
    {"model": {"attention": "manual", "dropout": 0.1}}, {"train": {"grad_accum": 2}},
    {"train": {"precision": "bf16"}}, {"model": {"d_model": 128, "n_layer": 3},
                                       "train": {"seq_len": 128}},
])
def test_activations_are_what_autograd_keeps(variant):
    tree = {"model": {"n_layer": 2, "n_head": 4, "d_model": 64},
            "train": {"batch_size": 4, "seq_len": 64}, "tokenizer": {"kind": "byte"}}
    for section, values in variant.items():
        tree[section] = {**tree[section], **values}
    cfg = RunConfig.model_validate(tree)
    saved, _ = _measured_activations(cfg, 256)
    assert 0.85 * saved <= activation_bytes(cfg, 256) <= 1.15 * saved


def test_activations_with_checkpointing_or_fused_dropout_stay_a_lower_bound():
    base = {"model": {"n_layer": 4, "n_head": 4, "d_model": 64},
            "train": {"batch_size": 4, "seq_len": 64}, "tokenizer": {"kind": "byte"}}
    for every in (1, 2):
        cfg = RunConfig.model_validate({**base, "train": {**base["train"],
                                                          "activation_checkpointing": every}})
        saved, one_block = _measured_activations(cfg, 256)
        # The forward keeps less; one block is recomputed at a time during backward.
        assert saved <= activation_bytes(cfg, 256) <= 1.15 * (saved + one_block)
    # SDPA with dropout: PyTorch's CPU fallback keeps the T x T weights the fused CUDA kernels
    # never materialise; the estimate counts the kernels', so it stays below on CPU.
    cfg = RunConfig.model_validate({**base, "model": {**base["model"], "dropout": 0.1}})
    saved, _ = _measured_activations(cfg, 256)
    assert 0.5 * saved <= activation_bytes(cfg, 256) <= saved


# ---- impossible shapes are refused at validate time -------------------------------------------

def test_shapes_that_cannot_fit_are_refused_with_the_estimate(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["controlled"]["model"].update(n_layer=10000, d_model=1000000, n_head=1000)
    err = refused(tmp_path, spec)
    path = tmp_path / "bad.yaml"
    assert err.field == "controlled.model" and err.line == line_of(path, "model:")
    assert "the model (n_layer 10,000, d_model 1,000,000" in err.message
    assert "needs at least" in err.message and "PiB" in err.message and "of memory" in err.message

    spec = base_spec(articles_data)
    spec["controlled"]["train"]["batch_size"] = 1_000_000_000
    err = refused(tmp_path, spec)
    assert err.field == "controlled.train.batch_size"
    assert "a micro-batch of 1,000,000,000 x 32 tokens needs at least" in err.message

    spec = base_spec(articles_data)  # fits the machine, not the declared budget
    spec["budget"]["max_memory_mb"] = 1
    spec["controlled"]["train"]["batch_size"] = 512
    spec["budget"]["tokens"] = 512 * 32 * 2
    err = refused(tmp_path, spec)
    assert "more than budget.max_memory_mb (1 MiB)" in err.message

    spec = base_spec(articles_data)  # an arm's own value is what is too big: it is blamed
    spec["independent"] = {"variables": ["model.n_layer"], "arms": {
        "small": {"model.n_layer": 1}, "huge": {"model.n_layer": 10**12}}}
    spec["hypothesis"]["checks"] = []
    err = refused(tmp_path, spec)
    assert err.field == "independent.arms.huge.model.n_layer" and "arm huge:" in err.message

    path = write(tmp_path, {**base_spec(articles_data), "controlled": {
        **base_spec(articles_data)["controlled"], "model": {"n_layer": 10000, "d_model": 1000000,
                                                            "n_head": 1000}}})
    done = lmlab("validate", path)
    assert done.returncode == 2 and f"{path}:" in done.stderr and "Traceback" not in done.stderr


def test_a_gpu_spec_is_checked_against_its_budget_not_this_machine(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["controlled"]["hardware"] = "H100"
    spec["controlled"]["model"].update(n_layer=48, d_model=8192, n_head=64)  # ~39B parameters
    assert load_plan(write(tmp_path, spec)).runs  # may well fit where it is meant to run
    spec["budget"]["max_memory_mb"] = 80_000
    err = refused(tmp_path, spec)
    assert "more than budget.max_memory_mb (80000 MiB)" in err.message


def test_lmlab_train_refuses_a_model_this_machine_cannot_hold(tmp_path, articles_data):
    config = tmp_path / "huge.yaml"
    config.write_text(yaml.safe_dump({"data": articles_data, "model": {
        "n_layer": 10000, "d_model": 1000000, "n_head": 1000}, "budget": {"steps": 5}}))
    doc = upgrade_run_doc(load_yaml(config))
    cfg = validate(doc, RunConfig)
    with pytest.raises(UserError) as info, doc.located():  # as `lmlab train` runs it
        run_single(cfg, tmp_path / "out", "huge-s0")
    assert str(info.value).startswith(f"{config}:{line_of(config, 'model:')} model: the model "
                                      "(n_layer 10,000")
    assert "of memory this machine has" in info.value.message
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_a_failing_timing_worker_is_a_user_error_with_its_own_message(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["controlled"]["tokenizer"] = {"kind": "gpt2"}
    spec["controlled"]["train"]["init_from"] = "./no-such-checkpoint"
    plan = load_plan(write(tmp_path, spec))
    with pytest.raises(UserError) as info:
        estimate_wall_clock(plan, None, prepare_plan_data(plan))
    assert info.value.message.startswith("arm slow: timing 12 steps of this shape failed: ")
    assert "pretrained GPT-2 directory './no-such-checkpoint' does not exist" in info.value.message


# ---- hostile input --------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 8, "not UTF-8 text"),
    (BOMB.encode(), f"its aliases expand to more than {MAX_VALUES:,} values"),
    (b"a: &a [*a]\n", "a YAML alias refers to itself"),
    (b"meta:\n  name: x\x01y\n", "not YAML text: character 0x0001"),
    (("a: " + "[" * 3000 + "]" * 3000).encode(), "nested too deeply"),
    (b"x: " + b"y" * (2 << 20), "more than 1 MiB"),
], ids=["binary", "alias bomb", "recursive alias", "control character", "deep nesting",
        "oversized"])
def test_hostile_input_is_refused_by_the_loader(tmp_path, content, needle):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_yaml(path)
    assert info.value.file == str(path) and needle in info.value.message


def test_binary_and_bomb_specs_exit_2_naming_the_file(tmp_path):
    assert len(BOMB) < 400  # a few hundred bytes for 9**9 values
    for name, content in (("binary.yaml", bytes(range(256)) * 8), ("bomb.yaml", BOMB.encode())):
        path = tmp_path / name
        path.write_bytes(content)
        done = lmlab("validate", path)
        assert done.returncode == 2 and f"error: {path}:" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# ---- the max_seq_len error names the field that is wrong -------------------------------------

def test_max_seq_len_error_names_the_field_and_line(tmp_path, articles_data):
    spec = base_spec(articles_data)
    spec["controlled"]["model"]["max_seq_len"] = 16  # shorter than train.seq_len 32
    err = refused(tmp_path, spec)
    assert err.field == "controlled.model.max_seq_len"
    assert err.line == line_of(tmp_path / "bad.yaml", "max_seq_len:")
    assert err.message == "arm slow: model.max_seq_len=16 is shorter than train.seq_len=32"

    spec = base_spec(articles_data)  # the arm's own seq_len is what is too long
    spec["controlled"]["model"]["max_seq_len"] = 32
    spec["independent"] = {"variables": ["train.seq_len"], "arms": {
        "short": {"train.seq_len": 32}, "long": {"train.seq_len": 64}}}
    spec["hypothesis"]["checks"] = []
    err = refused(tmp_path, spec)
    assert err.field == "independent.arms.long.train.seq_len"
    assert err.message.endswith("shorter than train.seq_len=64 (got 64)")

    spec = base_spec(articles_data)  # an error inside the model section, not the arm's
    spec["controlled"]["model"]["n_head"] = 3
    err = refused(tmp_path, spec)
    assert err.field == "controlled.model.d_model" and "not divisible by n_head=3" in err.message


def test_a_run_config_points_at_max_seq_len_too(tmp_path, articles_data):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": articles_data, "model": {"max_seq_len": 16},
                                      "train": {"seq_len": 32}, "budget": {"steps": 2}}))
    with pytest.raises(UserError) as info:
        validate(upgrade_run_doc(load_yaml(config)), RunConfig)
    assert str(info.value) == (f"{config}:{line_of(config, 'max_seq_len:')} model.max_seq_len: "
                               "model.max_seq_len=16 is shorter than train.seq_len=32")
