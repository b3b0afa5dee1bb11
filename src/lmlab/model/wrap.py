"""What is applied around a built model, never inside its forward: activation checkpointing and
torch.compile (the torchtitan way: the model code stays plain, the systems choices are layers on
top that an experiment can switch on and off)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmlab.model.gpt import GPT


def _checkpointed_forward(self: nn.Module, x: Tensor) -> Tensor:
    # The class's forward, not ``self.forward`` (which is this function): keep the block's
    # activations only at its input and recompute the rest during backward. Non-reentrant
    # checkpointing supports torch.compile, kwargs and grads to inputs that don't require them,
    # and it replays the RNG state, so dropout masks match between forward and recompute.
    return checkpoint(type(self).forward, self, x, use_reentrant=False)


def apply_activation_checkpointing(model: GPT, every: int) -> GPT:
    """Recompute block activations in backward instead of storing them: every=1 checkpoints each
    block, every=k blocks 0, k, 2k, ..., every=0 none. Returns the same model, changed in place.

    The block's ``forward`` is replaced on the instance only, so the module tree, parameter
    names and state-dict keys are exactly those of the plain model: checkpoints load either way,
    and optimizer grouping and diagnostics see the same names. The replacement is a bound method,
    which ``copy.deepcopy`` (EMA copies) rebinds to the copied block.
    """
    if every < 0:
        raise ValueError(f"activation checkpointing 'every' must be >= 0, got {every}")
    if every == 0:
        return model
    for i, block in enumerate(model.blocks):
        if i % every == 0 and not is_checkpointed(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune",
                      "max-autotune-no-cudagraphs"]
# Modes that replay CUDA graphs: each training step must be marked as a new one, or the next
# replay may overwrite outputs the previous step still needs.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

Fn = Callable[[Tensor], Tensor]


def maybe_compile(model: Fn, mode: CompileMode) -> tuple[Fn, str | None]:
    """(what to train, None) or, when torch.compile can't be used here, (model, the reason).
    ``model`` is a module or a function of one tensor (``GPT.hidden``, a pack's stacked forward).

    torch.compile is lazy: nothing is compiled until the first call, so a failure there (no C++
    compiler for inductor on CPU, an unsupported op) is the caller's to catch, fall back from
    and record. Parameters are shared with ``model``, whose names have no ``_orig_mod.`` prefix:
    save checkpoints and build optimizer groups from ``model``, not from the compiled wrapper.
    """
    if mode == "off":
        return model, None
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        return model, f"torch.compile is not supported on this platform/Python (torch {torch.__version__})"
    try:
        compiled = torch.compile(model, mode=mode)
    except Exception as e:  # e.g. a Python version this torch build's dynamo doesn't know
        return model, f"torch.compile unavailable: {type(e).__name__}: {e}"
    return compiled, None


class CompileFallback:
    """The module a training step calls: ``torch.compile(model)`` until compiling fails, then the
    eager ``model`` for good. Failing can happen at compile time (no dynamo on this platform) or
    lazily at the first call (no C++ compiler for inductor, an unsupported op); either way
    ``on_fallback`` is told why, once, and training goes on.

    The first call is watched; after one call succeeds the compiled module is trusted and
    called directly. Parameters are shared with ``model``: save checkpoints, build optimizer
    groups and evaluate from ``model``, not from the compiled wrapper.
    """

    def __init__(self, model: Fn, mode: CompileMode, on_fallback: Callable[[str], None]) -> None:
        self.eager = model
        self.on_fallback = on_fallback
        self.fn, note = maybe_compile(model, mode)
        if note is not None:
            on_fallback(note)
        self.trusted = mode == "off" or note is not None
        self.graphs = mode in CUDAGRAPH_MODES and note is None and torch.cuda.is_available()

    def __call__(self, x: Tensor) -> Tensor:
        if self.graphs:
            # A new step begins: outputs of the previous replay (consumed by its backward) may
            # be overwritten. Harmless when the graph was not captured (CPU tensors).
            torch.compiler.cudagraph_mark_step_begin()
        if self.trusted:
            return self.fn(x)
        try:
            out = self.fn(x)
        except Exception as e:  # e.g. torch._dynamo / inductor errors on the first real call
            self.on_fallback(f"{type(e).__name__}: {e}"[:2000])
            self.fn = self.eager
            out = self.fn(x)
        self.trusted = True
        return out
