"""The image-text objective (DivE's task) for the shared loop, as kdwonn/DivE trains it: batches of images
with all their captions, DivE's parameter groups, both set heads, and the named terms ``triplet`` (the
max-violation triplet with the official mean reduction), ``mmd`` and ``diversity`` (both modalities, summed)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.config.imagetext import ImageTextModelParams, ImageTextTrainParams
from stages.core.errors import LangdmlError
from stages.core.imagetext.model import ImageTextModel, save_imagetext
from stages.core.imagetext.tokens import TokenSets
from stages.core.imagetext.towers import TextTower, augment_ids, drop_regions
from stages.core.model.set_losses import hardest_negative_triplet, mmd_exp_kernel, slot_diversity
from stages.core.training import checkpoint as ckpt
from stages.core.training import distributed
from stages.core.training.fit import CheckpointSpec, FitSpec, LoopOptions, OptimSpec, TrainResult, fit, start_run
from stages.core.training.optim import ScheduleSpec


@dataclass
class ImageTextData:
    """Training inputs: image files' and captions' token sets, which image id each row shows, and what the
    features stage cached for the text tower (its description, ``text_tower.json``, and its arrays)."""

    images: TokenSets
    image_ids: np.ndarray  # per image file (several files may show one image id)
    captions: TokenSets
    caption_image_ids: np.ndarray
    tower: TextTower
    text_arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _views(image_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Image id -> the rows of its files (its views)."""
    order = np.argsort(image_ids, kind="stable")
    ids, starts = np.unique(image_ids[order], return_index=True)
    return {int(i): rows for i, rows in zip(ids, np.split(order, starts[1:]), strict=True)}


class ImageBatches:
    """DivE's batches (kdwonn/DivE ``data.py``): ``batch_size`` images in a seeded random order, each with one
    of its files drawn at random (the views of an image id) and ALL its captions, so a dataset with T captions
    per image gives B x T captions per batch and an epoch is one pass over the images. A last batch of fewer
    than ``min_size`` images is dropped: a lone image has no negative, and under DDP every process needs one."""

    def __init__(
        self,
        caption_image_ids: np.ndarray,
        image_ids: np.ndarray,
        batch_size: int,
        seed: int,
        min_size: int = 2,
    ) -> None:
        if set(caption_image_ids.tolist()) - set(image_ids.tolist()):
            raise LangdmlError(
                "some training captions show an image with no image file; re-run `langdml imagetext-prepare`"
            )
        self.views = _views(image_ids)
        self.captions = _views(caption_image_ids)
        self.ids = np.array(sorted(set(self.views) & set(self.captions)), dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.starts = range(0, len(self.ids) - (min_size - 1), batch_size)
        if len(self.starts) <= 0:
            raise LangdmlError("the training split has fewer than 2 captioned images; nothing to train on")

    def __len__(self) -> int:
        return len(self.starts)

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]]:
        """(image file rows, caption rows, the step's key (seed, epoch, step) that seeds its augmentation) per
        step: B files, then the captions of those images in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self.ids[rng.permutation(len(self.ids))]
        for step, start in enumerate(self.starts):
            chosen = order[start : start + self.batch_size]
            files = np.array([rng.choice(self.views[int(i)]) for i in chosen])
            yield files, np.concatenate([self.captions[int(i)] for i in chosen]), (self.seed, epoch, step)


class ImageTextObjective(nn.Module):
    """Both set heads and DivE's terms. ``forward(images, captions, image_ids, caption_image_ids)`` returns
    the unweighted terms: the heads embed this process's rows; under DDP their outputs are gathered into
    the global batch (:func:`distributed.gather_rows`), whose ``*_ids`` say which image each row shows, so
    every term is the one-process value while only this rank's rows carry gradient (hence the world-size
    gradient scales: DDP averages the ranks' gradients)."""

    def __init__(
        self,
        model: ImageTextModel,
        data: ImageTextData,
        *,
        margin: float,
        warmup_epochs: int,
        mmd: float,
        diversity: float,
        lr: float = 1e-3,
        lr_scales: dict[str, float] | None = None,
        caption_drop: float = 0.0,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.lr_scales = {"image": 1.0, "text": 1.0, "text_set": 1.0, **(lr_scales or {})}
        self.data = data
        self.margin = margin
        self.warmup_epochs = warmup_epochs
        self.weights = {"triplet": 1.0, "mmd": float(mmd), "diversity": float(diversity)}
        self.gradient_scales: dict[str, float] = {}
        self.ctx = distributed.Context()
        self.hardest = warmup_epochs == 0
        self.caption_drop, self.region_drop = caption_drop, region_drop

    def param_groups(self) -> list[dict[str, Any]]:
        """DivE's groups (``train.py``): the image tower at ``image_lr_scale`` (officially every image-encoder
        parameter but the CNN, which cached features do not have), the text tower's set prediction module
        at ``text_set_lr_scale`` and the rest of the text tower (word embeddings and GRU, or the fine-tuned
        transformer and its projection) at ``text_lr_scale``, times the lr."""
        text_set = {id(p) for p in self.model.text.set_module()}
        groups = [
            ("image", list(self.model.image.parameters()), self.lr_scales["image"]),
            ("text", [p for p in self.model.text.parameters() if id(p) not in text_set], self.lr_scales["text"]),
            ("text_set", self.model.text.set_module(), self.lr_scales["text_set"]),
        ]
        return [{"params": params, "lr": self.lr * scale, "name": name} for name, params, scale in groups if params]

    def set_epoch(self, epoch: int) -> None:
        """VSE0 (every negative) during the warm-up epochs, the hardest negative after."""
        self.hardest = epoch >= self.warmup_epochs

    def distribute(self, ctx: distributed.Context) -> None:
        self.ctx = ctx
        self.gradient_scales = {name: float(ctx.world) for name in self.weights}

    def inputs(
        self, batch: tuple[np.ndarray, np.ndarray, tuple[int, int, int]], device: torch.device
    ) -> tuple[Any, ...]:
        """This rank's rows of the batch, augmented (DivE's region dropping, and token dropping for captions
        cached as token ids), seeded by the step and the rank, so a rerun draws the same."""
        imgs, caps, key = batch
        world, rank = self.ctx.world, self.ctx.rank  # each rank embeds its contiguous share of both
        rng = np.random.default_rng([*key, rank])
        tower = self.data.tower

        def regions(x: np.ndarray) -> np.ndarray:
            return drop_regions(x, self.region_drop, rng)

        def words(x: np.ndarray) -> np.ndarray:
            return augment_ids(x, self.caption_drop, tower.vocab_size, tower.mask_id, rng)

        ids = self.data.captions.channels == 0
        return (
            self.data.images.batch(np.array_split(imgs, world)[rank], device, regions if self.region_drop else None),
            self.data.captions.batch(
                np.array_split(caps, world)[rank], device, words if self.caption_drop and ids else None
            ),
            torch.as_tensor(self.data.image_ids[imgs], device=device),
            torch.as_tensor(self.data.caption_image_ids[caps], device=device),
        )

    def forward(
        self,
        image_batch: tuple[torch.Tensor, torch.Tensor],
        text_batch: tuple[torch.Tensor, torch.Tensor],
        image_ids: torch.Tensor,
        caption_image_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        img = self.model.image.forward_tokens(*image_batch)
        txt = self.model.text.forward_tokens(*text_batch)
        img_emb, txt_emb = self._gather(img["embeddings"]), self._gather(txt["embeddings"])
        img_res, txt_res = self._gather(img["residual"]), self._gather(txt["residual"])
        positive = image_ids[:, None] == caption_image_ids[None, :]
        dim = img_emb.shape[-1]
        return {
            "triplet": hardest_negative_triplet(
                self.model.score(img_emb, txt_emb), positive, self.margin, self.hardest
            ),
            "mmd": mmd_exp_kernel(img_emb.reshape(-1, dim), txt_emb.reshape(-1, dim)),
            "diversity": slot_diversity(img_res) + slot_diversity(txt_res),  # summed, as DivE's uniformity terms
        }

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather_rows(x, self.ctx)


@dataclass(frozen=True)
class ImageTextPaths:
    model: Path
    checkpoint: Path
    logs: Path


def fingerprint_params(seed: int, mp: ImageTextModelParams, tp: ImageTextTrainParams) -> dict[str, Any]:
    """The params (by their dvc.yaml names) that decide the weights of the image-text model
    (:func:`ckpt.train_section_fingerprint`, the rule of both tasks)."""
    return {
        "seed": seed,
        "imagetext.model": mp.model_dump(),
        "imagetext.train": ckpt.train_section_fingerprint(tp),
    }


def train_imagetext(
    data: ImageTextData,
    mp: ImageTextModelParams,
    tp: ImageTextTrainParams,
    seed: int,
    paths: ImageTextPaths,
    input_files: list[Path],
) -> TrainResult:
    """Train both set heads through the shared loop (checkpoint every epoch, resume, export).

    Under torchrun (``imagetext.train.nproc``) every process draws the same global batches and embeds its
    contiguous share; the terms are computed on the gathered global batch, so a run depends on the global
    batch size, not on the process count."""
    run = start_run(tp.device, seed)
    batches = ImageBatches(data.caption_image_ids, data.image_ids, tp.batch_size, seed, max(2, run.ctx.world))
    model = ImageTextModel(data.images.channels, data.tower, mp)
    data.tower.kind.initialise(model.text, data.tower, data.text_arrays)
    objective = ImageTextObjective(
        model,
        data,
        margin=tp.margin,
        warmup_epochs=tp.warmup_epochs,
        mmd=tp.mmd,
        diversity=tp.diversity,
        lr=tp.lr,
        lr_scales={"image": tp.image_lr_scale, "text": tp.text_lr_scale, "text_set": tp.text_set_lr_scale},
        caption_drop=tp.caption_drop,
        region_drop=tp.region_drop,
    ).to(run.device)
    config = ckpt.fingerprint_config(fingerprint_params(seed, mp, tp), run.device.type, input_files)
    spec = FitSpec(
        LoopOptions(
            epochs=tp.epochs,
            batch_size=tp.batch_size,
            amp=tp.amp,
            amp_dtype=tp.amp_dtype,
            clip=tp.clip,
            params="imagetext.train",
            max_steps_per_epoch=tp.max_steps_per_epoch,
        ),
        OptimSpec(tp.optimizer, tp.lr, tp.weight_decay, tp.scheduler, ScheduleSpec(tp.epochs, len(batches))),
        CheckpointSpec(paths.checkpoint, config),
        paths.logs,
        lambda: save_imagetext(model, paths.model),
        outputs=[paths.model],
    )
    return fit(run, objective, batches, spec)
