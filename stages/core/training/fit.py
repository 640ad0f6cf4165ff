"""The one training loop of both tasks: an objective of named terms, epochs of batches, one checkpoint.

What a task brings (:class:`Objective`): a module whose ``forward`` returns unweighted loss terms by name,
the ``weights`` the loop sums them with, its optimiser ``param_groups`` (each with its own lr), how a loader
batch reaches the device (``inputs``), ``set_epoch`` (a schedule of its own, e.g. a warm-up; may do
nothing) and ``distribute`` (global-batch terms under DDP), and a :class:`FitSpec` (what to build and
where to write). What the loop owns: the optimiser and schedule, built from the registries by the spec's
:class:`OptimSpec` (per epoch or per step), bf16 autocast, optional gradient-norm clipping, the per-step stop on a
non-finite total, DDP gradient scales, the fingerprinted checkpoint with every rank's RNG state (an exact
resume), dvclive rows, the per-epoch evaluation hook and everything that rank 0 alone does.

Reproducibility is built from explicit state: the batches come from seeded samplers (``batches.epoch``),
and the global RNG states (dropout, drop-connect, PML miners) are in the per-epoch checkpoint. So a run
killed anywhere and re-run resumes at the last finished epoch and ends with the weights of an
uninterrupted run (with ``deterministic`` on a GPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.io import remove_stale_temporaries
from stages.core.runtime import autocast, resolve_device, seed_everything
from stages.core.training import checkpoint as ckpt
from stages.core.training import distributed
from stages.core.training.live import TIMINGS, LiveLog
from stages.core.training.optim import Schedule, ScheduleSpec, build_optimizer, build_schedule

log = logging.getLogger(__name__)

TOTAL = "total"


class Objective(Protocol):
    """What a task hands the loop (an ``nn.Module``; see the module docstring)."""

    weights: dict[str, float]
    gradient_scales: dict[str, float]

    def __call__(self, *inputs: Any) -> dict[str, torch.Tensor]: ...
    def param_groups(self) -> list[dict[str, Any]]: ...
    def inputs(self, batch: Any, device: torch.device) -> tuple[Any, ...]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def distribute(self, ctx: distributed.Context) -> None: ...


class Batches(Protocol):
    """The batches of one epoch, the same on every rank (each rank takes its share in ``inputs``)."""

    def epoch(self, epoch: int) -> Iterable[Any]: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Run:
    """The process's place in a run: DDP context, device, and the seeded generator of its loaders."""

    ctx: distributed.Context
    device: torch.device
    generator: torch.Generator

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def start_run(device: str, seed: int, deterministic: bool = False) -> Run:
    """Join the DDP group (if torchrun started us), pick the device, seed every RNG. Call before the task
    builds its model, so every rank draws the same initial weights."""
    resolved = resolve_device(device)
    ctx = distributed.setup(resolved.type)
    return Run(ctx, distributed.device_for(ctx, resolved), seed_everything(seed, deterministic))


@dataclass(frozen=True)
class LoopOptions:
    epochs: int
    batch_size: int  # the global batch, in samples (for samples/s)
    log_every: int = 10
    amp: bool = False  # autocast of the forward pass (CUDA only)
    amp_dtype: str = "bfloat16"  # float16: with a GradScaler (kdwonn/DivE train.py)
    clip: float | None = None  # gradient-norm clipping (None: off)
    params: str = "train"  # the params section named in messages ("imagetext.train")
    evaluate_every: int = 0  # epochs between calls of the evaluation hook (0: never)
    max_steps_per_epoch: int | None = None  # a dry run's cut: each epoch ends after this many steps


@dataclass(frozen=True)
class CheckpointSpec:
    path: Path
    config: dict[str, Any]  # what decides the weights (:func:`checkpoint.fingerprint_config`)

    @property
    def fingerprint(self) -> str:
        return ckpt.fingerprint(self.config)


# evaluate(epoch) -> metrics to log beside the losses (e.g. ``test/recall@1``); rank 0 only.
EpochHook = Callable[[int], dict[str, float]]


@dataclass(frozen=True)
class OptimSpec:
    """The optimiser and schedule by name (their registries), the base lr and weight decay."""

    optimizer: str
    lr: float
    weight_decay: float
    scheduler: str
    schedule: ScheduleSpec


@dataclass(frozen=True)
class FitSpec:
    """Everything :func:`fit` is told besides the objective and its batches. ``outputs``: the folders
    ``export`` writes (their stale temporaries, like the checkpoint's, go first); ``evaluate``: the
    per-epoch hook, every ``loop.evaluate_every`` epochs and after the last, its metrics logged with the
    losses; ``compile_model``: ``torch.compile`` the model after a resume."""

    loop: LoopOptions
    optim: OptimSpec
    checkpoint: CheckpointSpec
    log_dir: Path
    export: Callable[[], None]
    outputs: Sequence[Path] = ()
    evaluate: EpochHook | None = None
    compile_model: Callable[[], None] | None = None


@dataclass
class TrainResult:
    epochs_trained: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    main: bool = True  # this process wrote the outputs (rank 0)
    optimizer: torch.optim.Optimizer | None = None  # as the last epoch left it


class NonFiniteLoss(Exception):
    """Raised by a step before it touches the weights; carries the terms so the message names the bad one."""

    def __init__(self, terms: dict[str, torch.Tensor]) -> None:
        super().__init__("non-finite loss")
        self.terms = terms


@dataclass
class TrainStep:
    """One optimisation step: batch to the device, forward under autocast, weighted sum, backward (with
    the DDP gradient scales), optional clipping, optimiser (and per-step schedule) step. One scalar is read
    per step (is the total finite?), so no update is ever made from a NaN/inf loss. Returns the detached
    terms and their total on the device. The benchmarks time exactly this. With a ``scaler`` (float16
    autocast, kdwonn/DivE ``train.py``) the loss is scaled for the backward pass, the gradients unscaled
    before clipping, and a step whose gradients overflowed is skipped by the scaler (the schedule still
    steps, as there)."""

    objective: Any  # an Objective (nn.Module)
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: bool = False
    clip: float | None = None
    schedule: Schedule | None = None
    forward: Callable[..., dict[str, torch.Tensor]] | None = None  # e.g. DDP(objective)
    amp_dtype: str = "bfloat16"
    scaler: torch.amp.GradScaler | None = None

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs = self.objective.inputs(batch, self.device)
        with autocast(self.device, enabled=self.amp, dtype=self.amp_dtype):
            terms = (self.forward or self.objective)(*inputs)
        total = weighted_total(terms, self.objective.weights)
        if not bool(torch.isfinite(total)):  # one scalar read per step: a non-finite loss never updates
            raise NonFiniteLoss({k: v.detach() for k, v in terms.items()})
        self.optimizer.zero_grad(set_to_none=True)
        scales = self.objective.gradient_scales  # empty unless under DDP
        loss = weighted_total(terms, self.objective.weights, scales) if scales else total
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.schedule is not None and self.schedule.per_step:
            self.schedule.scheduler.step()
        return {**{k: v.detach().float() for k, v in terms.items()}, TOTAL: total.detach().float()}


def weighted_total(
    terms: dict[str, torch.Tensor], weights: dict[str, float], scales: dict[str, float] | None = None
) -> torch.Tensor:
    """sum_name weight[name] * scale[name] * term[name] (scale 1 unless given), in the objective's order."""
    if not terms:
        raise ValueError("the objective returned no loss terms")
    scales = scales or {}
    parts = [weights[name] * scales.get(name, 1.0) * value for name, value in terms.items()]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def fit(run: Run, objective: Objective, batches: Batches, spec: FitSpec) -> TrainResult:
    """Train ``objective`` (or resume it, or just re-export a finished run) and call ``spec.export`` on rank 0."""
    ctx, device = run.ctx, run.device
    options, checkpoint, evaluate = spec.loop, spec.checkpoint, spec.evaluate
    o = spec.optim
    optimizer = build_optimizer(o.optimizer, objective.param_groups(), o.lr, o.weight_decay)
    schedule = build_schedule(o.scheduler, optimizer, o.schedule)
    outputs = spec.outputs
    for folder in (checkpoint.path.parent, *outputs) if ctx.main else ():
        if folder.is_dir() and remove_stale_temporaries(folder):
            log.info("removed stale temporary files in %s", folder)
    half = run.cuda and options.amp and options.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if half else None
    start, history = _resume(checkpoint, options.epochs, objective, optimizer, schedule, ctx, scaler)
    if spec.compile_model is not None:
        spec.compile_model()
    forward = None
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective.distribute(ctx)
        forward = DistributedDataParallel(objective, device_ids=[device.index] if run.cuda else None)
    step_fn = TrainStep(
        objective,
        optimizer,
        device,
        amp=run.cuda and options.amp,
        clip=options.clip,
        schedule=schedule,
        forward=forward,
        amp_dtype=options.amp_dtype,
        scaler=scaler,
    )
    live = LiveLog(spec.log_dir, history) if ctx.main else None
    for epoch in range(start, options.epochs):
        objective.set_epoch(epoch)
        objective.train()
        row = _train_epoch(step_fn, batches, epoch, options, show=ctx.main)
        if not _weights_finite(objective):
            raise LangdmlError(
                f"model weights became non-finite in epoch {epoch + 1} although the losses were finite; "
                f"lower {options.params}.lr or set {options.params}.amp: false (no checkpoint written)"
            )
        if schedule is not None and not schedule.per_step:
            schedule.scheduler.step()
        if evaluate is not None and ctx.main and _evaluation_due(epoch, options):
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # evaluating never moves the training's random numbers
                row.update(evaluate(epoch))
            row["evaluate_s"] = time.perf_counter() - started
        history.append(row)
        rng_states = distributed.gather_objects(ckpt.rng_state(), ctx)  # every rank's, for an exact resume
        if ctx.main:
            state = {
                "fingerprint": checkpoint.fingerprint,
                "config": checkpoint.config,
                "epoch": epoch + 1,
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.scheduler.state_dict() if schedule is not None else None,
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                # Without timings: the checkpoint of a rerun is then byte-identical, and dvc.lock unchanged.
                "history": [{k: v for k, v in r.items() if k not in TIMINGS} for r in history],
            }
            ckpt.save_checkpoint(checkpoint.path, state, rng_states)
            live.log(row)
            shown = ", ".join(
                f"{k.removeprefix('loss/')} {v:.4f}" for k, v in row.items() if "/" in k and "lr/" not in k
            )
            log.info(  # the row rides along for tools that time a run (benchmarks/paper_scale.py)
                "epoch %d/%d: %s, %.1f samples/s, %.3f s/step",
                epoch + 1,
                options.epochs,
                shown,
                row["images_per_s"],
                row["step_s"],
                extra={"row": dict(row)},
            )
        distributed.barrier(ctx)  # no rank starts an epoch whose checkpoint is not on disk
    if ctx.main:
        live.end()
        spec.export()
        if start == options.epochs:
            log.info("checkpoint already finished all %d epochs: re-exported the model", options.epochs)
    distributed.barrier(ctx)
    distributed.teardown(ctx)
    return TrainResult(options.epochs - start, start, history, ctx.main, optimizer)


def _evaluation_due(epoch: int, options: LoopOptions) -> bool:
    every = options.evaluate_every
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == options.epochs)


def _resume(
    spec: CheckpointSpec,
    epochs: int,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    ctx: distributed.Context,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """(first epoch to run, history so far), restoring every state from a matching checkpoint; each rank
    takes its own RNG state (rank 0's when the checkpoint was made by fewer processes)."""
    state = ckpt.load_checkpoint(spec.path, spec.fingerprint, spec.config)
    if state is not None and state["epoch"] > epochs:
        log.info("checkpoint is at epoch %d, beyond %d epochs: starting fresh", state["epoch"], epochs)
        state = None
    if state is None:
        return 0, []
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    ckpt.set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    log.info("resuming from %s after epoch %d/%d", spec.path, state["epoch"], epochs)
    return int(state["epoch"]), list(state["history"])


def _weights_finite(module: nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in module.parameters()]
    return bool(torch.stack(flags).all())


class EpochMeter:
    """Sums of every named term, kept on the device and read (one host sync) only when asked. The names
    are whatever the step returns, in its order. (The step itself stops on a non-finite total.)"""

    def __init__(self, device: torch.device) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros(0, device=device)
        self.interval = torch.zeros(0, device=device)
        self.steps = 0
        self.interval_steps = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(terms)
            self.sums = torch.zeros(len(self.names), device=self.sums.device)
            self.interval = torch.zeros_like(self.sums)
        values = torch.stack([terms[n] for n in self.names])
        self.sums += values
        self.interval += values
        self.steps += 1
        self.interval_steps += 1

    def interval_means(self) -> dict[str, float]:
        means = (self.interval / max(self.interval_steps, 1)).tolist()
        self.interval.zero_()
        self.interval_steps = 0
        return dict(zip(self.names, means, strict=True))

    def epoch_means(self) -> dict[str, float]:
        return dict(zip(self.names, (self.sums / max(self.steps, 1)).tolist(), strict=True))


def _train_epoch(
    step_fn: TrainStep, batches: Batches, epoch: int, options: LoopOptions, show: bool = True
) -> dict[str, float]:
    """One pass over the epoch's batches (or its first ``max_steps_per_epoch``); the per-epoch log row, with
    ``step_s`` the mean step time after the first step (which also waits for the loader's start). Raises on a
    non-finite loss (one line naming the term, the epoch and the step). ``show``: this process draws the bar."""
    meter = EpochMeter(step_fn.device)
    t0 = time.perf_counter()
    first_done = t0
    cut = options.max_steps_per_epoch
    total = min(len(batches), cut) if cut else len(batches)
    bar = _progress(batches.epoch(epoch), total, f"epoch {epoch + 1}/{options.epochs}", show)
    for step, batch in enumerate(bar):
        try:
            terms = step_fn(batch)
        except NonFiniteLoss as bad:
            name = next((n for n, v in bad.terms.items() if not bool(torch.isfinite(v))), TOTAL)
            raise LangdmlError(
                f"non-finite {name} loss at epoch {epoch + 1}/{options.epochs}, step {step + 1}; no checkpoint "
                f"written (lower {options.params}.lr, check the inputs, or set {options.params}.amp: false)"
            ) from None
        meter.add(terms)
        if step == 0:
            first_done = time.perf_counter()
        if (step + 1) % options.log_every == 0:
            means = meter.interval_means()
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            log.debug("epoch %d step %d: %s", epoch + 1, step + 1, means)
        if step + 1 == cut:
            break
    means = meter.epoch_means()  # reads the device: every step has finished
    end = time.perf_counter()
    seconds = end - t0
    return {
        "epoch": float(epoch + 1),
        **{f"loss/{k}": v for k, v in means.items()},
        **{f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(step_fn.optimizer.param_groups)},
        "images_per_s": meter.steps * options.batch_size / seconds,
        "step_s": (end - first_done) / (meter.steps - 1) if meter.steps > 1 else seconds,
    }


def _progress(batches: Iterable[Any], total: int, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not show)
