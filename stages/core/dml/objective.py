"""The DML task for the shared loop: the image encoder, the base loss, the language targets, the terms.

:class:`DMLObjective` owns the image encoder, the base DML loss (with its learnable parameters), the
language targets and the weight of each term; ``forward(images, labels)`` returns the unweighted terms
by name (``dml``, ``language`` and, for a set head, ``diversity``), as pytorch-metric-learning's
``MultipleLosses`` and open_clip's loss dict do. :func:`train_dml` builds it with its class-balanced
batches and hands both to :func:`stages.core.training.fit.fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.core.config import TrainConfig
from stages.core.data.sampling import ClassBalancedBatchSampler
from stages.core.data.train_images import Pipeline, TrainImages, move_images
from stages.core.dml.losses import DMLLoss, build_dml_loss
from stages.core.dml.matching import language_matching
from stages.core.dml.s2sd import S2SD
from stages.core.errors import LangdmlError
from stages.core.language.targets import LanguageSources, LanguageTarget, build_language_targets, cache_files
from stages.core.model.encoder import EmbeddingModel, build_model, save_model
from stages.core.model.set_losses import slot_diversity
from stages.core.model.similarity import SimilaritySpec
from stages.core.runtime import channels_last
from stages.core.training import checkpoint as ckpt
from stages.core.training.distributed import Context, gather_all
from stages.core.training.fit import (
    CheckpointSpec,
    EpochHook,
    FitSpec,
    LoopOptions,
    OptimSpec,
    TrainResult,
    fit,
    start_run,
)
from stages.core.training.optim import ScheduleSpec

log = logging.getLogger(__name__)


class DMLObjective(nn.Module):
    def __init__(
        self,
        model: EmbeddingModel,
        dml: DMLLoss,
        targets: list[LanguageTarget],
        *,
        omega: float,
        language_kwargs: dict[str, Any],
        image_similarity: SimilaritySpec,
        diversity: float = 0.0,
        to_device: Callable[[Any, torch.device], torch.Tensor] | None = None,
        lr: float = 1e-5,
        head_lr: float = 1e-3,
        s2sd: S2SD | None = None,
        s2sd_weights: tuple[float, float] = (0.0, 0.0),
        s2sd_weight_decay: float | None = None,
    ) -> None:
        """``image_similarity`` is S_img of the language term; ``diversity`` weighs DivE's slot-diversity
        term, which exists only for a head that exposes slot residuals (a set head); ``to_device`` turns a
        loader batch's images into the model's input (decoding or on-device augmentation)."""
        super().__init__()
        self.model = model
        self.dml = dml
        self.targets = targets
        self.language_kwargs = dict(language_kwargs)
        self.image_similarity = image_similarity
        self.lr, self.head_lr = lr, head_lr
        self.weights: dict[str, float] = {"dml": 1.0, "language": float(omega), "diversity": float(diversity)}
        self.s2sd = s2sd
        self.s2sd_weight_decay = s2sd_weight_decay
        if s2sd is not None:  # (L_source + mean L_target) / 2 + w * distill + feat_w * features (criteria/s2sd.py)
            weight, feat_weight = s2sd_weights
            self.weights.update(dml=0.5, s2sd_target=0.5, s2sd_distill=float(weight), s2sd_features=float(feat_weight))
        # Backward-only factors per term: under DDP the global-batch terms are scaled by the world size
        # (see stages/core/training/distributed.py); the reported values stay unscaled.
        self.gradient_scales: dict[str, float] = {}
        self.world = 1
        self._encode: Callable[[torch.Tensor], dict[str, Any]] = model.encode
        object.__setattr__(self, "_to_device", to_device or move_images)

    def distribute(self, ctx: Context) -> None:
        """Global-batch base loss and language term across the processes (call before DDP wraps it)."""
        self.world = ctx.world
        self.dml.distribute()
        self.gradient_scales = {"dml": float(ctx.world), "language": float(ctx.world)}

    def set_epoch(self, epoch: int) -> None:
        """No schedule of its own (S2SD's feature-distillation delay counts steps)."""

    def compile_model(self) -> None:
        """``torch.compile`` the encoder's forward; state dicts keep the plain module's keys."""
        object.__setattr__(self, "_encode", torch.compile(self.model.encode))

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone (lr), head (head_lr), the loss's own parameters (their lr, else head_lr)."""
        groups: list[dict[str, Any]] = [
            {"params": list(self.model.backbone.parameters()), "lr": self.lr, "name": "backbone"},
            {"params": list(self.model.head.parameters()), "lr": self.head_lr, "name": "head"},
        ]
        groups += [{"lr": self.head_lr, **g} for g in self.dml.param_groups()]
        if self.s2sd is not None:  # the target heads and their losses at the lr, as the official optim_dict_list
            group = {"params": list(self.s2sd.parameters()), "lr": self.lr, "name": "s2sd"}
            if self.s2sd_weight_decay is not None:
                group["weight_decay"] = self.s2sd_weight_decay
            groups.append(group)
        return groups

    def inputs(self, batch: tuple[Any, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self._to_device(x, device), y.to(device, non_blocking=True)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted loss terms; the losses run in float32 even when the encoder ran under autocast."""
        out = self._encode(images)
        with torch.autocast(images.device.type, enabled=False):
            emb = out["embeddings"].float()
            terms = {"dml": self.dml(emb, labels) / self.world, "language": self._language(emb, labels)}
            if "residual" in out:
                terms["diversity"] = slot_diversity(out["residual"].float())
            if self.s2sd is not None:
                terms.update(self.s2sd.terms(emb, labels, out["features"]))
            return terms

    def _language(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean matching loss over the targets (``both`` has two); zero without guidance."""
        if not self.targets:
            return torch.zeros((), device=emb.device)
        if self.world > 1:
            emb, labels = gather_all(emb, labels)
        losses = [
            language_matching(emb, labels, t(labels), similarity=self.image_similarity, **self.language_kwargs)
            for t in self.targets
        ]
        return torch.stack(losses).mean()


class LoaderBatches:
    """A DataLoader over the class-balanced sampler; ``epoch(e)`` reseeds the sampler for epoch e."""

    def __init__(self, loader: DataLoader, sampler: ClassBalancedBatchSampler) -> None:
        self.loader, self.sampler = loader, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        return self.loader


@dataclass(frozen=True)
class TrainPaths:
    checkpoint: Path
    model_dir: Path
    log_dir: Path
    class_embeddings: Path
    pseudolabels: Path


def fingerprint_params(config: TrainConfig) -> dict[str, Any]:
    """The params (by their dvc.yaml names) that decide the weights (:func:`ckpt.train_section_fingerprint`)."""
    return {
        "seed": config.seed,
        "omega": config.omega,
        "model": config.model.model_dump(),
        "language": config.language.model_dump(),
        "train": ckpt.train_section_fingerprint(config.train),
        "losses": {k: dict(v or {}) for k, v in config.losses.items()},
    }


def image_similarity(config: TrainConfig, model: EmbeddingModel) -> SimilaritySpec:
    """S_img of the language term, centred: the head's own similarity, or ``language.similarity`` by name."""
    name = config.language.similarity
    spec = model.similarity if name == "head" else SimilaritySpec(name, alpha=config.model.alpha)
    return spec.centred()


def train_dml(
    config: TrainConfig,
    images: TrainImages,
    paths: TrainPaths,
    *,
    input_files: Sequence[Path] = (),
    class_names: dict[int, str] | None = None,
    cache_params: dict[str, dict[str, Any]] | None = None,
    evaluation: Callable[[EmbeddingModel], EpochHook] | None = None,
) -> TrainResult:
    """Train (or resume, or just re-export) and write the model from ``images`` (decoded per epoch or
    from the decoded-image cache, :mod:`stages.core.data.train_images`). ``cache_params``
    (``class_embeddings`` / ``pseudolabels`` -> params) are checked against the caches' metadata.
    ``evaluation(model)`` makes the per-epoch hook (every ``train.evaluate_every`` epochs)."""
    tp, mp, lp = config.train, config.model, config.language
    # Everything below is built in a fixed order, so the seeded RNG draws are too (on every rank).
    run = start_run(tp.device, config.seed, tp.deterministic)
    model = build_model(mp)
    data = images.build(Pipeline(mp.image_size, model.mean, model.std, tp.augment))
    labels = data.labels
    if len(labels) == 0:
        raise LangdmlError("the training manifest has no images; check dataset params and re-run `langdml prepare`")
    class_ids = np.unique(labels)
    steps = max(1, len(labels) // tp.batch_size)
    sampler = ClassBalancedBatchSampler(
        labels,
        tp.samples_per_class,
        tp.batch_size,
        steps,
        config.seed,
        rank=run.ctx.rank,
        world=run.ctx.world,
        replacement=tp.class_draws == "with_replacement",
    )
    plg_sets = SimilaritySpec("smooth_chamfer", alpha=mp.alpha, centered=True)
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
    targets = build_language_targets(lp.guidance, config.omega, sources, run.device)
    files = [*input_files, *cache_files(lp.guidance, config.omega, sources)]
    spec = CheckpointSpec(paths.checkpoint, ckpt.fingerprint_config(fingerprint_params(config), run.device.type, files))
    dml = build_dml_loss(
        tp.loss, len(class_ids), mp.embed_dim, config.loss_kwargs(), similarity=model.similarity, slots=mp.slots
    )
    s2sd = None
    if tp.s2sd.enabled:
        if model.similarity.sets:
            raise LangdmlError("train.s2sd works with one vector per image (model.head: linear), not with sets")
        sp = tp.s2sd
        s2sd = S2SD(
            model.channels,
            sp.target_dims,
            lambda dim: build_dml_loss(tp.loss, len(class_ids), dim, config.loss_kwargs()),
            temperature=sp.temperature,
            feat_distill=sp.feat_distill,
            feat_delay=sp.feat_delay,
            pool_aggr=sp.pool_aggr,
        )
    objective = DMLObjective(
        model,
        dml,
        targets,
        omega=config.omega,
        language_kwargs=lp.matching_kwargs(),
        image_similarity=image_similarity(config, model),
        diversity=tp.diversity,
        to_device=data.to_device,
        lr=tp.lr,
        head_lr=tp.effective_head_lr,
        s2sd=s2sd,
        s2sd_weights=(tp.s2sd.weight, tp.s2sd.feat_weight),
        s2sd_weight_decay=tp.s2sd.weight_decay,
    ).to(run.device)
    channels_last(model)
    loader = DataLoader(
        data.dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=tp.num_workers,
        pin_memory=run.cuda,
        persistent_workers=tp.num_workers > 0,
        # Own generator: creating an iterator must not consume the global RNG we checkpoint.
        generator=run.generator,
    )
    loop = LoopOptions(
        epochs=tp.epochs,
        batch_size=tp.batch_size,
        log_every=tp.log_every,
        amp=tp.amp,
        evaluate_every=tp.evaluate_every if evaluation is not None else 0,
        max_steps_per_epoch=tp.max_steps_per_epoch,
    )
    schedule = ScheduleSpec(tp.epochs, steps, tp.milestones, tp.lr_decay)
    fit_spec = FitSpec(
        loop,
        OptimSpec(tp.optimizer, tp.lr, tp.weight_decay, tp.scheduler, schedule),
        spec,
        paths.log_dir,
        lambda: save_model(model, mp, paths.model_dir),
        outputs=[paths.model_dir],
        evaluate=evaluation(model) if evaluation is not None and tp.evaluate_every else None,
        compile_model=objective.compile_model if tp.compile else None,
    )
    return fit(run, objective, LoaderBatches(loader, sampler), fit_spec)
