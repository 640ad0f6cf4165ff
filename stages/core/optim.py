"""Optimisers and learning-rate schedules by name (``train.optimizer``, ``train.scheduler``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stages.core.config import TrainParams
from stages.core.registry import Registry

OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)

SchedulerFactory = Callable[[torch.optim.Optimizer, TrainParams], Any]
SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler")


@SCHEDULERS.register("none")
def _none(opt: torch.optim.Optimizer, tp: TrainParams) -> None:
    return None


@SCHEDULERS.register("multistep")
def _multistep(opt: torch.optim.Optimizer, tp: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(opt, tp.milestones, gamma=tp.lr_decay)


@SCHEDULERS.register("cosine")
def _cosine(opt: torch.optim.Optimizer, tp: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp.epochs)


def build_optimizer(tp: TrainParams, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``groups`` as the objective gives them (each with a ``name`` and, where it differs, an ``lr``)."""
    return OPTIMIZERS.get(tp.optimizer)(groups, lr=tp.lr, weight_decay=tp.weight_decay)


def build_scheduler(tp: TrainParams, optimizer: torch.optim.Optimizer) -> Any:
    """The per-epoch schedule, or None for a constant learning rate."""
    return SCHEDULERS.get(tp.scheduler)(optimizer, tp)
