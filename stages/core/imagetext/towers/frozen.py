"""``frozen:<encoder>``: a frozen text encoder's token features, cached once; only the set head trains."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.imagetext.towers import TEXT_TOWERS, CaptionCache, HeadFactory, TextTower, Tokenizer, TowerKind


class FrozenTower(nn.Module):
    """The set head over cached token features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.similarity = head.similarity

    def set_module(self) -> list[nn.Parameter]:
        return self.head.set_module()

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        return self.head.forward_tokens(tokens, mask)


class _Frozen(TowerKind):
    def cache(
        self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any, words: Any = None
    ) -> CaptionCache:
        sets = self.tokenizer(TextTower(f"frozen:{arg}", max_tokens), device)(texts)
        return CaptionCache(sets, TextTower(f"frozen:{arg}", max_tokens, details={"channels": sets[0].shape[1]}))

    def tokenizer(self, tower: TextTower, device: Any) -> Tokenizer:
        from stages.core.language.encoders import create_text_encoder

        encoder = create_text_encoder(tower.arg, device=device)
        return lambda texts: encoder.tokens(texts, 64, tower.max_tokens)

    def build(self, tower: TextTower, head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        return FrozenTower(head(int(tower.details["channels"])))


TEXT_TOWERS.register("frozen")(_Frozen())
