"""The training loop: setup, resume, epochs, export.

Reproducibility is built from explicit state: batches and augmentation seeds come from
:mod:`stages.core.sampling`, and the global RNG states (dropout, drop-connect, PML miners) are in
the per-epoch checkpoint (:mod:`stages.core.checkpoint`). So a run killed anywhere and re-run
resumes at the last finished epoch and, with ``train.deterministic``, ends with the same weights
as an uninterrupted run. The loss terms come from :class:`~stages.core.objective.Objective`; the
loop only sums them, and everything it logs or checks iterates over their names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stages.core import checkpoint as ckpt
from stages.core import distributed
from stages.core.config import TrainConfig
from stages.core.errors import LangdmlError
from stages.core.io import remove_stale_temporaries
from stages.core.language_targets import LanguageSources, build_language_targets, cache_files
from stages.core.live import TIMINGS, LiveLog
from stages.core.losses import build_dml_loss
from stages.core.objective import Objective, weighted_total
from stages.core.optim import build_optimizer, build_scheduler
from stages.core.runtime import autocast, resolve_device, seed_everything
from stages.core.sampling import ClassBalancedBatchSampler
from stages.core.similarity import make_similarity
from stages.core.train_images import Pipeline, TrainImages, move_images
from stages.core.vision import build_model, save_model

log = logging.getLogger(__name__)

TOTAL = "total"
# Row entries that differ between identical runs: logged, never written where DVC hashes them.


@dataclass(frozen=True)
class TrainPaths:
    checkpoint: Path
    model_dir: Path
    log_dir: Path
    class_embeddings: Path
    pseudolabels: Path


@dataclass
class TrainResult:
    epochs_trained: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLoss(Exception):
    """Raised by a step before it touches the weights; carries the terms so the message names the bad one."""

    def __init__(self, terms: dict[str, torch.Tensor]) -> None:
        super().__init__("non-finite loss")
        self.terms = terms


@dataclass
class TrainStep:
    """One optimisation step: move the batch, run the objective under autocast, sum the weighted
    terms, step. Returns the detached terms and their total on the device. One scalar is read per
    step (is the total finite?), so no update is ever made from a NaN/inf loss; the terms themselves
    are read only when the caller looks (every ``log_every`` steps). The benchmark times exactly this."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: bool = False  # bf16 autocast for the forward pass (CUDA)
    forward: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None  # e.g. DDP(objective)
    inputs: Callable[[Any, torch.device], torch.Tensor] = move_images  # a loader batch -> the model's input

    def __call__(self, x: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.inputs(x, self.device)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, enabled=self.amp):
            terms = (self.forward or self.objective)(x, y)
        total = weighted_total(terms, self.objective.weights)
        if not bool(torch.isfinite(total)):  # one scalar read per step: a non-finite loss never updates
            raise NonFiniteLoss({k: v.detach() for k, v in terms.items()})
        self.optimizer.zero_grad(set_to_none=True)
        scales = self.objective.gradient_scales  # empty unless under DDP
        (weighted_total(terms, self.objective.weights, scales) if scales else total).backward()
        self.optimizer.step()
        return {**{k: v.detach().float() for k, v in terms.items()}, TOTAL: total.detach().float()}


def fit(
    config: TrainConfig,
    images: TrainImages,
    paths: TrainPaths,
    *,
    input_files: Sequence[Path] = (),
    class_names: dict[int, str] | None = None,
    cache_params: dict[str, dict[str, Any]] | None = None,
) -> TrainResult:
    """Train (or resume, or just re-export) and write the model from ``images`` (decoded per epoch or
    from the decoded-image cache, :mod:`stages.core.train_images`). ``cache_params``
    (``class_embeddings`` / ``pseudolabels`` -> params) are checked against the caches' metadata."""
    tp, mp = config.train, config.model
    # --- setup: everything below is built in a fixed order, so the seeded RNG draws are too (on every rank).
    device = resolve_device(tp.device)
    ctx = distributed.setup(device.type)
    device = distributed.device_for(ctx, device)
    cuda = device.type == "cuda"
    gen = seed_everything(config.seed, tp.deterministic)
    model = build_model(mp)
    data = images.build(Pipeline(mp.image_size, model.mean, model.std, tp.augment))
    labels = data.labels
    if len(labels) == 0:
        raise LangdmlError("the training manifest has no images; check dataset params and re-run `langdml prepare`")
    class_ids = np.unique(labels)
    sampler = ClassBalancedBatchSampler(
        labels,
        tp.samples_per_class,
        tp.batch_size,
        max(1, len(labels) // tp.batch_size),
        config.seed,
        rank=ctx.rank,
        world=ctx.world,
    )
    lp = config.language
    plg_sets = make_similarity("smooth_chamfer", alpha=mp.alpha, centered=True)
    sources = LanguageSources(
        class_ids,
        paths.class_embeddings,
        paths.pseudolabels,
        config.seed,
        class_names,
        plg_set_similarity=plg_sets if lp.plg_similarity == "smooth_chamfer" else None,
        class_embeddings_params=(cache_params or {}).get("class_embeddings"),
        pseudolabels_params=(cache_params or {}).get("pseudolabels"),
    )
    guidance = lp.guidance
    targets = build_language_targets(guidance, config.omega, sources, device)
    fp_config = ckpt.fingerprint_config(
        config, device.type, [*input_files, *cache_files(guidance, config.omega, sources)]
    )
    fp = ckpt.fingerprint(fp_config)
    dml = build_dml_loss(tp.loss, len(class_ids), mp.embed_dim, config.loss_kwargs(), slots=model.slots, alpha=mp.alpha)
    objective = Objective(
        model,
        dml,
        targets,
        omega=config.omega,
        language_kwargs=lp.matching_kwargs(),
        image_similarity=make_similarity(lp.similarity, alpha=mp.alpha, centered=True),
        diversity=tp.diversity,
    ).to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(tp, objective.param_groups(tp.lr, tp.effective_head_lr))
    scheduler = build_scheduler(tp, optimizer)

    # --- resume (temporaries of a kill during a checkpoint or model write are stale)
    for folder in (paths.checkpoint.parent, paths.model_dir) if ctx.main else ():
        if folder.is_dir() and remove_stale_temporaries(folder):
            log.info("removed stale temporary files in %s", folder)
    start, history = _resume(paths.checkpoint, fp, fp_config, tp.epochs, objective, optimizer, scheduler, ctx)

    # --- epochs (rank 0 alone logs, checkpoints and exports)
    loader = DataLoader(
        data.dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=tp.num_workers,
        pin_memory=cuda,
        persistent_workers=tp.num_workers > 0,
        # Own generator: creating an iterator must not consume the global RNG we checkpoint.
        generator=gen,
    )
    if tp.compile:
        objective.compile_model()
    forward = None
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective.distribute(ctx.world)
        forward = DistributedDataParallel(objective, device_ids=[device.index] if cuda else None)
    step_fn = TrainStep(objective, optimizer, device, amp=cuda and tp.amp, forward=forward, inputs=data.to_device)
    live = LiveLog(paths.log_dir, history) if ctx.main else None
    for epoch in range(start, tp.epochs):
        sampler.set_epoch(epoch)
        objective.train()
        row = _train_epoch(step_fn, loader, epoch, tp.epochs, tp.log_every, tp.batch_size, show=ctx.main)
        if not _weights_finite(objective):
            raise LangdmlError(
                f"model weights became non-finite in epoch {epoch + 1} although the losses were finite; "
                "lower train.lr or set train.amp: false (no checkpoint written)"
            )
        if scheduler is not None:
            scheduler.step()
        history.append(row)
        rng_states = distributed.gather_objects(ckpt.rng_state(), ctx)  # every rank's, for an exact resume
        if ctx.main:
            state = {
                "fingerprint": fp,
                "config": fp_config,
                "epoch": epoch + 1,
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                # Without timings: the checkpoint of a rerun is then byte-identical, and dvc.lock unchanged.
                "history": [{k: v for k, v in r.items() if k not in TIMINGS} for r in history],
            }
            ckpt.save_checkpoint(paths.checkpoint, state, rng_states)
            live.log(row)
            terms = ", ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in row.items() if k.startswith("loss/"))
            log.info("epoch %d/%d: %s, %.1f images/s", epoch + 1, tp.epochs, terms, row["images_per_s"])
        distributed.barrier(ctx)  # no rank starts an epoch whose checkpoint is not on disk

    # --- export
    if ctx.main:
        live.end()
        save_model(model, mp, paths.model_dir)
        if start == tp.epochs:
            log.info("checkpoint already finished all %d epochs: re-exported the model", tp.epochs)
    distributed.barrier(ctx)
    distributed.teardown(ctx)
    return TrainResult(epochs_trained=tp.epochs - start, resumed_from=start, history=history)


def _resume(
    path: Path,
    fp: str,
    fp_config: dict[str, Any],
    epochs: int,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: distributed.Context,
) -> tuple[int, list[dict[str, float]]]:
    """(first epoch to run, history so far), restoring every state from a matching checkpoint; each rank
    takes its own RNG state (rank 0's when the checkpoint was made by fewer processes)."""
    state = ckpt.load_checkpoint(path, fp, fp_config)
    if state is not None and state["epoch"] > epochs:
        log.info("checkpoint is at epoch %d, beyond train.epochs=%d: starting fresh", state["epoch"], epochs)
        state = None
    if state is None:
        return 0, []
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    ckpt.set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
    log.info("resuming from %s after epoch %d/%d", path, state["epoch"], epochs)
    return int(state["epoch"]), list(state["history"])


def _weights_finite(module: torch.nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in module.parameters()]
    return bool(torch.stack(flags).all())


class EpochMeter:
    """Sums of every named term and the first non-finite step, kept on the device; read (one host
    sync) only when asked. The names are whatever the step returns, in its order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.sums = torch.zeros(0, device=device)
        self.interval = torch.zeros(0, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_term = torch.zeros((), dtype=torch.long, device=device)
        self.steps = 0
        self.interval_steps = 0

    def add(self, terms: dict[str, torch.Tensor], step: int) -> None:
        if not self.names:
            self.names = list(terms)
            self.sums = torch.zeros(len(self.names), device=self.device)
            self.interval = torch.zeros_like(self.sums)
        values = torch.stack([terms[n] for n in self.names])
        finite = torch.isfinite(values)
        newly_bad = (self.first_bad < 0) & ~finite.all()
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_term = torch.where(newly_bad, torch.argmin(finite.long()), self.bad_term)
        self.sums += values
        self.interval += values
        self.steps += 1
        self.interval_steps += 1

    def check(self, epoch: int, epochs: int) -> None:
        """Stop at the first non-finite loss, before anything is checkpointed."""
        step = int(self.first_bad)
        if step >= 0:
            raise LangdmlError(
                f"non-finite {self.names[int(self.bad_term)]} loss at epoch {epoch + 1}/{epochs}, step {step + 1}; "
                "no checkpoint written (lower train.lr, check the inputs, or set train.amp: false)"
            )

    def interval_means(self) -> dict[str, float]:
        means = (self.interval / max(self.interval_steps, 1)).tolist()
        self.interval.zero_()
        self.interval_steps = 0
        return dict(zip(self.names, means, strict=True))

    def epoch_means(self) -> dict[str, float]:
        return dict(zip(self.names, (self.sums / max(self.steps, 1)).tolist(), strict=True))


def _train_epoch(
    step_fn: TrainStep,
    loader: DataLoader,
    epoch: int,
    epochs: int,
    log_every: int,
    batch_size: int,
    show: bool = True,
) -> dict[str, float]:
    """One pass over the loader; the per-epoch log row (``batch_size``: the global batch). Raises on a
    non-finite loss. ``show``: this process draws the progress bar (rank 0)."""
    meter = EpochMeter(step_fn.device)
    t0 = time.perf_counter()
    bar = _progress(loader, f"epoch {epoch + 1}/{epochs}", show)
    for step, (x, y) in enumerate(bar):
        try:
            terms = step_fn(x, y)
        except NonFiniteLoss as bad:
            meter.add({**bad.terms, TOTAL: torch.full((), float("nan"), device=step_fn.device)}, step)
            meter.check(epoch, epochs)
            raise
        meter.add(terms, step)
        if (step + 1) % log_every == 0:
            meter.check(epoch, epochs)
            means = meter.interval_means()
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            log.debug("epoch %d step %d: %s", epoch + 1, step + 1, means)
    meter.check(epoch, epochs)
    seconds = time.perf_counter() - t0
    return {
        "epoch": float(epoch + 1),
        **{f"loss/{k}": v for k, v in meter.epoch_means().items()},
        **{f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(step_fn.optimizer.param_groups)},
        "images_per_s": meter.steps * batch_size / seconds,
    }


def _progress(loader: DataLoader, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show)
