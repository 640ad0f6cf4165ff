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

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core.config import CrossModalModelParams
from stages.core.errors import LangdmlError
from stages.core.imagetext.tokens import TokenSets
from stages.core.imagetext.towers import tower_kind
from stages.core.io import atomic_path, write_json
from stages.core.model.heads import DivEHead, SlotOptions, masked_pool
from stages.core.model.similarity import COSINE
from stages.core.registry import Registry

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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


SetHeadFactory = Callable[[int, CrossModalModelParams, SlotOptions], nn.Module]
SET_HEADS: Registry[SetHeadFactory] = Registry("set head")


@SET_HEADS.register("dive")
def _dive(channels: int, mp: CrossModalModelParams, options: SlotOptions) -> nn.Module:
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
def _maxpool(channels: int, mp: CrossModalModelParams, options: SlotOptions) -> nn.Module:
    return MaxPoolHead(channels, mp.embed_dim)


def slot_options(mp: CrossModalModelParams, modality: str, project: bool = True) -> SlotOptions:
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
    )


class CrossModalModel(nn.Module):
    """An image set head over cached image tokens and a text tower (:mod:`stages.core.imagetext.towers`)
    over what the features stage cached for the captions (``text_info``)."""

    def __init__(self, image_channels: int, text_info: dict[str, Any], mp: CrossModalModelParams) -> None:
        super().__init__()
        self.params = mp
        self.text_info = text_info
        head = SET_HEADS.get(mp.head)
        self.image = head(image_channels, mp, slot_options(mp, "image"))
        self.image_channels = image_channels

        def text_head(channels: int, project: bool = True) -> nn.Module:
            return head(channels, mp, slot_options(mp, "text", project))

        kind, _ = tower_kind(text_info["tower"])
        self.text = kind.build(text_info, text_head, mp.embed_dim, mp.dropout)
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


def save_crossmodal(model: CrossModalModel, directory: Path) -> None:
    """Weights as safetensors and the head config as JSON, each written atomically."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    config = {"model": model.params.model_dump(), "image_channels": model.image_channels, "text": model.text_info}
    write_json(directory / CONFIG_NAME, config)


def load_crossmodal(directory: Path, device: torch.device) -> CrossModalModel:
    from safetensors.torch import load_file

    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise LangdmlError(f"no cross-modal model in {directory}; run `langdml xm-train`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise LangdmlError(f"{cfg_path} is unreadable ({err}); re-run `langdml xm-train`") from None
    if "image_channels" not in cfg and "embed_dim" in cfg:  # the DML model's config: it has no text tower
        raise LangdmlError(
            f"{directory} is an image-only model: text queries need the image-text model (`langdml xm-train`)"
        )
    try:
        model = CrossModalModel(cfg["image_channels"], cfg["text"], CrossModalModelParams(**cfg["model"]))
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # a damaged file of either kind: one line naming the fix
        raise LangdmlError(
            f"{directory}: unreadable cross-modal model ({str(err).splitlines()[0]}); re-run `langdml xm-train`"
        ) from None
    return model.to(device).eval()
