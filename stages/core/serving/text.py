"""Text queries against the image-text model's index: a caption turned into what the features stage cached
for it (the frozen encoder's token features, or the text tower's token ids: the tower's own tokenizer, saved
with the model), through the trained text tower, then the images ranked by the model's similarity (as
imagetext_evaluate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.serving.index import GalleryIndex, check_k, model_fingerprint


@dataclass
class TextRetriever:
    model: Any
    tokenize: Any  # captions -> what the features stage cached for each
    index: GalleryIndex
    device: Any

    @classmethod
    def load(
        cls, model_dir: str | Path, index_dir: str | Path, device: str = "cpu", verify: bool = False
    ) -> TextRetriever:
        """The image-text model and its index (``verify``: check the index files' content hashes too)."""
        from stages.core.imagetext.model import load_imagetext
        from stages.core.model.saved import WEIGHTS_NAME
        from stages.core.runtime import resolve_device

        device = resolve_device(device)
        model_dir, index_dir = Path(model_dir), Path(index_dir)
        model = load_imagetext(model_dir, device)
        index = GalleryIndex.load(
            index_dir, model_fingerprint(model_dir / WEIGHTS_NAME), stage="imagetext-index", verify=verify
        )
        return cls(model, model.tower.kind.tokenizer(model.tower, device), index, device)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """N x K x D sets of the captions (an empty one is one line)."""
        from stages.core.imagetext.model import embed_sets
        from stages.core.imagetext.tokens import ragged_token_sets

        if not texts or any(not t.strip() for t in texts):
            raise LangdmlError("a text query is empty")
        sets = ragged_token_sets(self.tokenize(list(texts)))
        return embed_sets(self.model.text, sets, self.device)

    def search_texts(self, texts: Sequence[str], k: int = 10) -> list[tuple[str, list[dict[str, Any]]]]:
        check_k(k, len(self.index))
        scores, rows = self.index.search(self.embed_text(texts), k)
        return list(zip(texts, self.index.results(scores, rows), strict=True))
