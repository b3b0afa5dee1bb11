"""Optimizers and learning-rate schedules.

``build_optimizer`` turns an ``OptimizerConfig`` into one ``torch.optim.Optimizer`` (AdamW, SGD,
Lion, Adafactor or Muon) over parameter groups formed the same way for every optimizer;
``build_schedule`` turns a ``ScheduleConfig`` into a pure ``(step, progress) -> multiplier``
function, which the training loop applies with ``set_lr``.
"""

from lmlab.optim.lion import Lion
from lmlab.optim.muon import Muon, newton_schulz
from lmlab.optim.optimizers import (
    KINDS,
    build_optimizer,
    build_param_groups,
    classify_params,
    optimizer_state_bytes,
    set_lr,
    skips_on_device,
)
from lmlab.optim.schedules import LRSchedule, build_schedule

__all__ = [
    "KINDS",
    "LRSchedule",
    "Lion",
    "Muon",
    "build_optimizer",
    "build_param_groups",
    "build_schedule",
    "classify_params",
    "newton_schulz",
    "optimizer_state_bytes",
    "set_lr",
    "skips_on_device",
]
