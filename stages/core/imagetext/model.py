"""The image-text model (DivE's own task): a registered set head per modality over cached token features.

Both modalities are token sets: an image is the grid cells of a frozen backbone's last feature map (or
precomputed regions), a caption the token features of a frozen text encoder. A set head (``dive``: K slots
by slot attention, the DML head's module; ``maxpool``: one max-pooled vector, the VSE-infinity-like K=1
baseline) turns each into unit vectors; the head's :class:`SimilaritySpec` says how they are compared
(smooth-Chamfer for ``dive``, the cosine for ``maxpool``). Training goes through the shared loop with
:mod:`stages.core.imagetext.objective`.
"""

from __future__ import annotations

import json
import math
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
from stages.core.io import atomic_path, write_json
from stages.core.model.heads import DivEHead
from stages.core.model.similarity import COSINE
from stages.core.registry import Registry

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class MaxPoolHead(nn.Module):
    """One vector per input: projected tokens (with DivE's residual MLP), max-pooled over the valid ones."""

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

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        local = self.local(tokens)
        local = local + self.local_mlp(local)
        if mask is not None:
            local = local.masked_fill(mask.unsqueeze(-1), -math.inf)
        pooled = local.max(dim=1).values.unsqueeze(1)
        return {"embeddings": F.normalize(pooled.float(), dim=-1), "residual": pooled.float()}


SetHeadFactory = Callable[[int, CrossModalModelParams], nn.Module]
SET_HEADS: Registry[SetHeadFactory] = Registry("set head")


@SET_HEADS.register("dive")
def _dive(channels: int, mp: CrossModalModelParams) -> nn.Module:
    return DivEHead(channels, mp.embed_dim, slots=mp.slots, depth=mp.slot_depth, heads=mp.slot_heads, alpha=mp.alpha)


@SET_HEADS.register("maxpool")
def _maxpool(channels: int, mp: CrossModalModelParams) -> nn.Module:
    return MaxPoolHead(channels, mp.embed_dim)


class CrossModalModel(nn.Module):
    """A set head per modality over cached token features."""

    def __init__(self, image_channels: int, text_channels: int, mp: CrossModalModelParams) -> None:
        super().__init__()
        self.params = mp
        self.image = SET_HEADS.get(mp.head)(image_channels, mp)
        self.text = SET_HEADS.get(mp.head)(text_channels, mp)
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
    channels = {"image_channels": model.image.local.in_features, "text_channels": model.text.local.in_features}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(directory / CONFIG_NAME, {"model": model.params.model_dump(), **channels})


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
        model = CrossModalModel(cfg["image_channels"], cfg["text_channels"], CrossModalModelParams(**cfg["model"]))
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # a damaged file of either kind: one line naming the fix
        raise LangdmlError(
            f"{directory}: unreadable cross-modal model ({str(err).splitlines()[0]}); re-run `langdml xm-train`"
        ) from None
    return model.to(device).eval()
