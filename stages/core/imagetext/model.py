"""The image-text model (DivE's own task): a registered set head over cached image tokens and a text tower.

Both modalities are token sets: an image is the grid cells of a frozen backbone's last feature map (or
precomputed regions), a caption the token features of a frozen text encoder or the token ids of a
trainable text tower (:mod:`stages.core.imagetext.towers`). A set head (``dive``: K slots
by slot attention, the DML head's module; ``maxpool``: one max-pooled vector, the VSE-infinity-like K=1
baseline) turns each into unit vectors; the head's :class:`SimilaritySpec` says how they are compared
(smooth-Chamfer for ``dive``, the cosine for ``maxpool``). Training goes through the shared loop with
:mod:`stages.core.imagetext.objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core.config.imagetext import ImageTextModelParams
from stages.core.imagetext.tokens import TokenSets
from stages.core.imagetext.towers import TextTower
from stages.core.model import saved
from stages.core.model.heads import DivEHead, SlotOptions, masked_pool
from stages.core.model.similarity import COSINE
from stages.core.registry import Registry


class MaxPoolHead(nn.Module):
    """One vector per input: projected tokens (with DivE's residual MLP), max-pooled over the valid ones; a
    global feature from the tower (a text tower's GRU) is added, as DivE adds its slots to it."""

    similarity = COSINE
    slots = 1

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.local = nn.Linear(channels, embed_dim)
        self.local_mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.ReLU(), nn.Linear(embed_dim // 2, embed_dim)
        )

    def set_module(self) -> list[nn.Parameter]:
        """No set prediction module: one pooled vector."""
        return []

    def forward_tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, glob: torch.Tensor | None = None
    ) -> dict[str, Any]:
        local = self.local(tokens)
        local = local + self.local_mlp(local)
        pooled = masked_pool(local, mask, "max").unsqueeze(1)
        if glob is not None:
            pooled = pooled + glob.unsqueeze(1)
        return {"embeddings": F.normalize(pooled.float(), dim=-1), "residual": pooled.float()}


SetHeadFactory = Callable[[int, ImageTextModelParams, SlotOptions], nn.Module]
SET_HEADS: Registry[SetHeadFactory] = Registry("set head")


@SET_HEADS.register("dive")
def _dive(channels: int, mp: ImageTextModelParams, options: SlotOptions) -> nn.Module:
    return DivEHead(
        channels,
        mp.embed_dim,
        slots=mp.slots,
        depth=mp.slot_depth,
        heads=mp.slot_heads,
        alpha=mp.alpha,
        options=options,
    )


@SET_HEADS.register("maxpool")
def _maxpool(channels: int, mp: ImageTextModelParams, options: SlotOptions) -> nn.Module:
    return MaxPoolHead(channels, mp.embed_dim)


def slot_options(mp: ImageTextModelParams, modality: str, project: bool = True) -> SlotOptions:
    """The set module's options for one modality: the image head has DivE's projection details
    (``img_1x1_dropout``, the MLP's BatchNorm, the global pooling), the text head its key positions."""
    image = modality == "image"
    return SlotOptions(
        head_dim=mp.slot_head_dim,
        dropout=mp.dropout,
        global_pool=mp.global_pool,
        local_dropout=mp.image_local_dropout if image else 0.0,
        local_bn=mp.image_local_bn if image else False,
        project=project,
        key_positions=mp.text_positions and not image,
        padding=mp.padding,
        separate_global=mp.image_global_projection == "separate" and image,
    )


class ImageTextModel(nn.Module):
    """An image set head over cached image tokens and a text tower (:mod:`stages.core.imagetext.towers`)
    over what the features stage cached for the captions (its :class:`TextTower`)."""

    def __init__(self, image_channels: int, tower: TextTower, mp: ImageTextModelParams) -> None:
        super().__init__()
        self.params = mp
        self.tower = tower
        head = SET_HEADS.get(mp.head)
        self.image = head(image_channels, mp, slot_options(mp, "image"))
        self.image_channels = image_channels

        def text_head(channels: int, project: bool = True) -> nn.Module:
            return head(channels, mp, slot_options(mp, "text", project))

        self.text = tower.kind.build(tower, text_head, mp.embed_dim, mp.dropout)
        self.similarity = self.image.similarity

    def score(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Images x captions similarities of the sets, by the heads' spec."""
        return self.similarity(images, captions)


@torch.no_grad()
def embed_sets(head: nn.Module, sets: TokenSets, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """N x K x D unit vectors of every token set."""
    head.eval()
    out = []
    for start in range(0, len(sets), batch_size):
        rows = np.arange(start, min(start + batch_size, len(sets)))
        out.append(head.forward_tokens(*sets.batch(rows, device))["embeddings"].float().cpu().numpy())
    return np.concatenate(out)


def save_imagetext(model: ImageTextModel, directory: Path) -> None:
    """The trained model in the one model format (:mod:`stages.core.model.saved`)."""
    config = {"model": model.params.model_dump(), "image_channels": model.image_channels}
    saved.save(model, directory, "imagetext", {**config, "text": model.tower.to_json()})


def load_imagetext(directory: Path, device: torch.device) -> ImageTextModel:
    def build(config: dict[str, Any]) -> nn.Module:
        tower = TextTower.from_json(config["text"])
        return ImageTextModel(config["image_channels"], tower, ImageTextModelParams(**config["model"]))

    return saved.load(directory, "imagetext", build, device)[0]  # type: ignore[return-value]
