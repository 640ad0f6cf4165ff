"""The image encoder: a registered backbone, a registered head, L2-normalised embeddings; save and load.

``save_model`` / ``load_model`` go through the one model format of both tasks (:mod:`stages.core.model.saved`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.config import ModelParams
from stages.core.errors import LangdmlError
from stages.core.model import saved
from stages.core.model.backbones import Backbone, create_backbone
from stages.core.model.heads import HEADS, global_pool
from stages.core.model.similarity import SimilaritySpec


class EmbeddingModel(nn.Module):
    """Backbone -> a registered head -> L2-normalised embeddings (B x D, or B x K x D for a set head);
    ``pooled`` is the head-less control."""

    def __init__(
        self, backbone: Backbone, head: nn.Module, pooling: str, embed_dim: int, freeze_bn: bool = False
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "avg+max"):
            raise LangdmlError(f"model.pooling must be avg or avg+max, got {pooling!r}")
        self.backbone = backbone.module
        self.head = head
        self.similarity: SimilaritySpec = head.similarity
        self.slots: int | None = head.slots
        self.pooling = pooling
        self.freeze_bn = freeze_bn
        self.channels = backbone.channels
        self.embed_dim = embed_dim
        self.mean = tuple(backbone.mean)
        self.std = tuple(backbone.std)

    def train(self, mode: bool = True) -> EmbeddingModel:
        """With ``freeze_bn`` BatchNorm keeps its ImageNet running statistics (paper's ResNet50 setting)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.backbone(x), self.pooling)

    def encode(self, x: torch.Tensor) -> dict[str, Any]:
        """The head's dict (``embeddings`` and what the head exposes: slot residuals, attention maps) and the
        backbone's feature map as ``features`` (S2SD's auxiliary heads read it)."""
        fmap = self.backbone(x)
        return {**self.head(fmap), "features": fmap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)["embeddings"]

    def spatial_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The head's maps over the feature grid (B x M x h x w) and their titles: a set head's slot
        attention, the linear head's feature norm."""
        return self.head.maps(self.backbone(x))


def build_model(model_params: ModelParams) -> EmbeddingModel:
    backbone = create_backbone(model_params.backbone, model_params.pretrained)
    head = HEADS.get(model_params.head)(backbone.channels, model_params)
    return EmbeddingModel(backbone, head, model_params.pooling, model_params.embed_dim, model_params.freeze_bn)


def save_model(model: EmbeddingModel, model_params: ModelParams, directory: str | Path) -> None:
    """The trained encoder in the one model format (:mod:`stages.core.model.saved`)."""
    config = {"model": model_params.model_dump(), "embed_dim": model.embed_dim, "channels": model.channels}
    saved.save(model, directory, "dml", {**config, "mean": list(model.mean), "std": list(model.std)})


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[EmbeddingModel, ModelParams]:
    """Rebuild the architecture (no pretrained download) and load the saved weights; eval mode."""

    def build(config: dict[str, Any]) -> nn.Module:
        return build_model(ModelParams(**config["model"]).model_copy(update={"pretrained": False}))

    model, config = saved.load(directory, "dml", build, device)
    return model, ModelParams(**config["model"])  # type: ignore[return-value]
