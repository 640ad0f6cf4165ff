"""Text queries against the image-text model's index: a caption through the frozen text encoder's token
features and the trained text set head, then the images ranked by the model's similarity (as xm_evaluate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.serving.index import GalleryIndex, model_fingerprint


@dataclass
class TextRetriever:
    model: Any
    encoder: Any
    max_tokens: int
    index: GalleryIndex
    device: Any

    @classmethod
    def load(
        cls, model_dir: str | Path, index_dir: str | Path, text_encoder: str, max_tokens: int, device: str = "cpu"
    ) -> TextRetriever:
        from stages.core.imagetext.model import WEIGHTS_NAME, load_crossmodal
        from stages.core.language.encoders import create_text_encoder

        model_dir, index_dir = Path(model_dir), Path(index_dir)
        model = load_crossmodal(model_dir, device)
        index = GalleryIndex.load(index_dir, model_fingerprint(model_dir / WEIGHTS_NAME), stage="xm-index")
        return cls(model, create_text_encoder(text_encoder, device=device), max_tokens, index, device)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """N x K x D sets of the captions (an empty one is one line)."""
        from stages.core.imagetext.model import embed_sets
        from stages.core.imagetext.tokens import ragged_token_sets

        if not texts or any(not t.strip() for t in texts):
            raise LangdmlError("a text query is empty")
        sets = ragged_token_sets(self.encoder.tokens(list(texts), 64, self.max_tokens))
        return embed_sets(self.model.text, sets, self.device)

    def search_texts(self, texts: Sequence[str], k: int = 10) -> list[tuple[str, list[dict[str, Any]]]]:
        scores, rows = self.index.search(self.embed_text(texts), k)
        return list(zip(texts, self.index.results(scores, rows), strict=True))
