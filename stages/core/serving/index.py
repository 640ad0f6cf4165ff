"""A gallery index of a trained model: the gallery's embeddings and items, tied to the model by fingerprint.

Layout of an index folder: ``embeddings.npy`` (N x D, or N x K x D for a set head: what the exact
smooth-Chamfer search needs), ``items.parquet`` (row, path, label, class name) and ``index.json`` (the model's
fingerprint = the SHA-256 of its weights, its similarity spec, the shape). No separate faiss file: an exact
flat index is these embeddings, rebuilt by faiss in a fraction of a second (100k x 512: ~0.1 s), and one file
then serves vectors and sets alike. Searching goes through :func:`stages.core.evaluation.search.searcher_for`,
so a query gets exactly the neighbours evaluation ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stages.core.errors import LangdmlError
from stages.core.evaluation.search import searcher_for
from stages.core.io import file_digest, read_parquet, replace_directory, staging_directory, write_json, write_parquet
from stages.core.model.similarity import SimilaritySpec

EMBEDDINGS, ITEMS, META = "embeddings.npy", "items.parquet", "index.json"
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
    ]
)


def model_fingerprint(weights: Path) -> str:
    """What ties an index to the model that embedded it: the SHA-256 of the weights file."""
    return file_digest(weights)


def write_index(
    directory: Path, embeddings: np.ndarray, items: pa.Table, fingerprint: str, similarity: SimilaritySpec
) -> None:
    """Write the index folder whole (staged beside it, then swapped in)."""
    with staging_directory(directory) as staging:
        np.save(staging / EMBEDDINGS, np.ascontiguousarray(embeddings, dtype=np.float32))
        write_parquet(staging / ITEMS, items, ITEMS_SCHEMA, {"rows": items.num_rows})
        meta = {
            "model_sha256": fingerprint,
            "similarity": {"name": similarity.name, "alpha": similarity.alpha, "centered": similarity.centered},
            "shape": list(embeddings.shape),
        }
        write_json(staging / META, meta)
        replace_directory(staging, directory)


@dataclass
class GalleryIndex:
    embeddings: np.ndarray
    items: list[dict[str, Any]]
    similarity: SimilaritySpec
    _searcher: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: Path, fingerprint: str, stage: str = "index") -> GalleryIndex:
        """The index in ``directory``; one made by another model (or none) is one line naming the stage."""
        meta_path = directory / META
        if not meta_path.is_file():
            raise LangdmlError(f"no index in {directory}; run `langdml {stage}` (or `dvc repro`)")
        try:
            meta = json.loads(meta_path.read_text())
            embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise LangdmlError(f"{directory}: unreadable index ({err}); run `langdml {stage}`") from None
        if meta.get("model_sha256") != fingerprint:
            raise LangdmlError(
                f"{directory} was built by another model than the one in use (its weights changed since); "
                f"run `langdml {stage}` (or `dvc repro`)"
            )
        table, _ = read_parquet(directory / ITEMS, stage)
        return cls(np.asarray(embeddings), table.to_pylist(), SimilaritySpec(**meta["similarity"]))

    def __len__(self) -> int:
        return len(self.items)

    def results(self, scores: np.ndarray, rows: np.ndarray) -> list[list[dict[str, Any]]]:
        """Per query, its results as rank, score, class (or caption) and path."""
        return [
            [
                {
                    "rank": r + 1,
                    "score": float(s),
                    "class_name": self.items[int(i)]["class_name"],
                    "path": self.items[int(i)]["path"],
                }
                for r, (s, i) in enumerate(zip(row_scores, row_ids, strict=True))
            ]
            for row_scores, row_ids in zip(scores, rows, strict=True)
        ]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and gallery rows (Q x k, best first) of each query embedding, by the model's similarity.
        The searcher is built on the first call and kept (a flat index copies the gallery once)."""
        if k > len(self):
            raise LangdmlError(f"k = {k} but the gallery has {len(self)} items; ask for at most {len(self)}")
        if self._searcher is None:
            self._searcher = searcher_for(self.similarity, self.similarity.layout(self.embeddings), len(self))
        return self._searcher(self.similarity.layout(queries), k)
