"""Parameter grouping and the optimizer factory.

Every optimizer gets the same parameter groups: one per parameter kind (matrix, head, embedding,
norm, bias), each carrying its ``kind``, its ``weight_decay``, its ``lr_mult`` and its ``base_lr``.
A schedule then only ever calls ``set_lr(optimizer, multiplier)``, which sets
``lr = base_lr * lr_mult * multiplier`` in every group, whatever the optimizer. That is what keeps
an optimizer comparison controlled: the grouping policy is identical across arms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.config import OptimizerConfig
from lmlab.errors import UserError
from lmlab.optim.lion import Lion
from lmlab.optim.muon import Muon

KINDS = ("matrix", "head", "embedding", "norm", "bias")
HEAD_NAMES = ("lm_head", "head")


def _is_norm(module: nn.Module) -> bool:
    # Custom norms (an RMSNorm written by hand, say) are recognised by their class name.
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    if hasattr(nn, "RMSNorm"):
        norm_types = (*norm_types, nn.RMSNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def classify_params(model: nn.Module) -> dict[str, str]:
    """Map every parameter name (as ``named_parameters()`` gives it, tied weights once) to its kind:
    "embedding", "head", "norm", "bias" or "matrix".

    A model that knows better says so with ``param_kinds()``; otherwise: ``nn.Embedding`` weights
    are embeddings, the weight of a module called ``lm_head``/``head`` is the head, vectors in a
    norm module are norms, other vectors are biases and everything else is a matrix.
    """
    names = [name for name, _ in model.named_parameters()]
    param_kinds = getattr(model, "param_kinds", None)
    if callable(param_kinds):
        kinds = dict(param_kinds())
        if set(kinds) != set(names):
            missing, extra = set(names) - set(kinds), set(kinds) - set(names)
            raise ValueError(f"{type(model).__name__}.param_kinds() does not match "
                             f"named_parameters(): missing {sorted(missing)}, extra {sorted(extra)}")
        unknown = {n: k for n, k in kinds.items() if k not in KINDS}
        if unknown:
            raise ValueError(f"param_kinds() returned unknown kinds {unknown}; expected {KINDS}")
        return {name: kinds[name] for name in names}

    kinds = {}
    seen: set[int] = set()  # named_modules/named_parameters skip tied duplicates; so must we
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Embedding):
                kinds[name] = "embedding"
            elif leaf in HEAD_NAMES and p.ndim >= 2:
                # Only the head's weight: its bias is a bias (no decay), like any other.
                kinds[name] = "head"
            elif p.ndim < 2:
                kinds[name] = "norm" if _is_norm(module) else "bias"
            else:
                kinds[name] = "matrix"
    return {name: kinds[name] for name in names}


def build_param_groups(cfg: OptimizerConfig, model: nn.Module, *,
                       muon: bool = False) -> list[dict[str, Any]]:
    """One group per parameter kind present (frozen parameters left out), in ``KINDS`` order.

    Weight decay applies to matrices and the head; to norms/biases and embeddings only when the
    config asks. With ``muon`` the matrix group is trained by Muon at ``muon_lr`` and the others by
    AdamW at ``lr``, so each group also carries ``use_muon``.
    """
    kinds = classify_params(model)
    by_kind: dict[str, list[nn.Parameter]] = {kind: [] for kind in KINDS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_kind[kinds[name]].append(p)

    decays = {
        "matrix": True,
        "head": True,
        "embedding": cfg.decay_embeddings,
        "norm": cfg.decay_norms_and_biases,
        "bias": cfg.decay_norms_and_biases,
    }
    lr_mults = {"embedding": cfg.embedding_lr_mult, "head": cfg.head_lr_mult}

    groups = []
    for kind in KINDS:
        if not by_kind[kind]:
            continue
        use_muon = muon and kind == "matrix"
        base_lr = cfg.muon_lr if use_muon else cfg.lr
        lr_mult = lr_mults.get(kind, 1.0)
        group: dict[str, Any] = {
            "params": by_kind[kind],
            "kind": kind,
            "base_lr": base_lr,
            "lr_mult": lr_mult,
            "lr": base_lr * lr_mult,
            "weight_decay": cfg.weight_decay if decays[kind] else 0.0,
        }
        if muon:
            group["use_muon"] = use_muon
        groups.append(group)
    return groups


def _fused_devices() -> set[str]:
    # Which devices have fused Adam/AdamW/SGD kernels depends on the torch version (CPU arrived in
    # 2.4); torch keeps the list in a private helper, so fall back to CUDA alone if it moves.
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return set(_get_fused_kernels_supported_devices())
    except ImportError:
        return {"cuda"}


def _resolve_impl(cfg: OptimizerConfig, device_type: str, supported: tuple[str, ...]) -> str:
    """The implementation to use: ``impl`` if this optimizer and device can honour it, and for
    "auto" the fastest one available (fused, then foreach, then plain)."""
    fused_ok = "fused" in supported and device_type in _fused_devices()
    if cfg.impl == "auto":
        if fused_ok:
            return "fused"
        return "foreach" if "foreach" in supported else "plain"
    if cfg.impl not in supported:
        raise UserError(f"{cfg.name} has no {cfg.impl!r} implementation "
                        f"(choose from auto, {', '.join(supported)})", field="optimizer.impl")
    if cfg.impl == "fused" and not fused_ok:
        raise UserError(f"fused {cfg.name} is not available on device {device_type!r} with "
                        f"torch {torch.__version__}; use impl 'auto' or 'foreach'",
                        field="optimizer.impl")
    return cfg.impl


def _impl_kwargs(impl: str) -> dict[str, bool]:
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "plain": {"foreach": False}}[impl]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer ``cfg`` describes over ``model``'s parameters, grouped by ``build_param_groups``.

    The implementation actually used ("fused", "foreach" or "plain") is recorded on the returned
    optimizer as ``lmlab_impl``.

    How the shared fields map onto each optimizer:
      adamw      lr, betas, eps, weight_decay (decoupled).
      sgd        lr, momentum, nesterov, weight_decay. torch's SGD decay is the classic L2 term
                 added to the gradient: the same as decoupled decay (lr·wd·θ) without momentum,
                 amplified by up to 1/(1−momentum) with it. betas and eps are unused.
      lion       lr, betas (β1 for the update, β2 for the momentum), weight_decay (decoupled).
      adafactor  torch.optim.Adafactor. lr is the cap on its relative step size
                 (step = min(lr, 1/sqrt(t)) · RMS(θ)); weight_decay is decoupled (θ·(1−lr·wd));
                 eps is eps1, the floor on the second-moment estimate's square root. It keeps no
                 first moment and sets its own β2 by step, so betas and momentum are unused.
      muon       matrices: muon_lr, momentum, nesterov, muon_ns_steps, weight_decay (decoupled);
                 everything else: AdamW with lr, betas, eps, weight_decay.
    """
    muon = cfg.name == "muon"
    groups = build_param_groups(cfg, model, muon=muon)
    if cfg.name in ("sgd", "muon") and cfg.nesterov and cfg.momentum == 0:
        raise UserError(f"nesterov needs momentum > 0 ({cfg.name}); set optimizer.momentum or "
                        "optimizer.nesterov: false", field="optimizer.nesterov")

    opt: torch.optim.Optimizer
    if cfg.name == "adamw":
        impl = _resolve_impl(cfg, device_type, ("fused", "foreach", "plain"))
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, **_impl_kwargs(impl))
    elif cfg.name == "sgd":
        impl = _resolve_impl(cfg, device_type, ("fused", "foreach", "plain"))
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, **_impl_kwargs(impl))
    elif cfg.name == "lion":
        impl = _resolve_impl(cfg, device_type, ("plain",))
        opt = Lion(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        impl = _resolve_impl(cfg, device_type, ("foreach", "plain"))
        opt = torch.optim.Adafactor(groups, lr=cfg.lr, eps=(cfg.eps, 1e-3),
                                    weight_decay=cfg.weight_decay, foreach=impl == "foreach")
    elif cfg.name == "muon":
        impl = _resolve_impl(cfg, device_type, ("plain",))
        opt = Muon(groups, lr=cfg.muon_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                   ns_steps=cfg.muon_ns_steps, betas=cfg.betas, eps=cfg.eps,
                   weight_decay=cfg.weight_decay)
    else:  # the config's Literal makes this unreachable unless a new name is added there only
        raise UserError(f"unknown optimizer {cfg.name!r}", field="optimizer.name")
    opt.lmlab_impl = impl  # type: ignore[attr-defined]
    return opt


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` tensor on the device, skipping the
    whole update (weights, state and step count) when it is non-zero: torch's fused Adam, AdamW
    and SGD, which mark themselves so for the AMP grad scaler. Lion, Muon, Adafactor and the
    foreach/plain implementations do not."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every group's lr to ``base_lr * lr_mult * multiplier`` (the schedule's value); returns
    the first group's, the lr a run logs."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * group["lr_mult"] * multiplier
    return optimizer.param_groups[0]["lr"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, momentum buffers, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
