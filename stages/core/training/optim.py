"""Optimisers and learning-rate schedules by name (``train.optimizer`` / ``train.scheduler`` and the
``imagetext.train`` twins), for the one training loop.

A schedule factory gets a :class:`ScheduleSpec` (epochs, steps per epoch, milestones, decay) and returns a
:class:`Schedule` that says whether the loop steps it after every optimiser step or after every epoch,
or None for a constant learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stages.core.registry import Registry

OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)


@dataclass(frozen=True)
class ScheduleSpec:
    epochs: int
    steps_per_epoch: int
    milestones: Sequence[int] = ()
    decay: float = 0.1


@dataclass
class Schedule:
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_step: bool = False


SchedulerFactory = Callable[[torch.optim.Optimizer, ScheduleSpec], Schedule | None]
SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler")


@SCHEDULERS.register("none")
def _none(opt: torch.optim.Optimizer, spec: ScheduleSpec) -> None:
    return None


@SCHEDULERS.register("multistep")
def _multistep(opt: torch.optim.Optimizer, spec: ScheduleSpec) -> Schedule:
    """lr times ``decay`` at each milestone epoch."""
    return Schedule(torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.milestones), gamma=spec.decay))


@SCHEDULERS.register("cosine")
def _cosine(opt: torch.optim.Optimizer, spec: ScheduleSpec) -> Schedule:
    """Cosine annealing to 0 over the epochs, stepped per epoch."""
    return Schedule(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs))


@SCHEDULERS.register("cosine_step")
def _cosine_step(opt: torch.optim.Optimizer, spec: ScheduleSpec) -> Schedule:
    """lr * (1 + cos(pi t / T)) / 2 after step t of T = epochs x steps, no warm-up (DivE's ``train.py``)."""
    total = spec.epochs * spec.steps_per_epoch
    return Schedule(
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))),
        per_step=True,
    )


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``groups`` as the objective gives them (each with a ``name`` and, where it differs, an ``lr``)."""
    return OPTIMIZERS.get(name)(groups, lr=lr, weight_decay=weight_decay)


def build_schedule(name: str, optimizer: torch.optim.Optimizer, spec: ScheduleSpec) -> Schedule | None:
    return SCHEDULERS.get(name)(optimizer, spec)
