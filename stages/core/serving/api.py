"""The Python face of a trained model: ``Retriever.load()`` then ``embed`` / ``search`` (``import langdml``).

``Retriever.load(model_dir, index_dir)`` loads the model and checks that the index was made by it and is whole;
queries are image files (or folders of them), embedded as evaluation embeds the test split, and ranked against
the gallery by the model's own similarity, so they get exactly the neighbours evaluation ranks. Every input
problem (a missing or inconsistent file, a bad device, k outside 1..N, a query vector of another width or with
NaN) raises :class:`stages.core.errors.LangdmlError` (``langdml.LangdmlError``) with a one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.serving.index import GalleryIndex, check_k, model_fingerprint
from stages.core.serving.queries import embed_images, image_files

MODEL_DIR = Path("data/model")
INDEX_DIR = Path("data/index")


@dataclass
class Retriever:
    model: Any
    image_size: int
    index: GalleryIndex
    device: Any
    fingerprint: str

    @classmethod
    def load(
        cls,
        model_dir: str | Path = MODEL_DIR,
        index_dir: str | Path = INDEX_DIR,
        device: str = "cpu",
        verify: bool = False,
    ) -> Retriever:
        """The model and its index (``verify``: check the index files' content hashes too, not just sizes)."""
        from stages.core.model.encoder import load_model
        from stages.core.model.saved import WEIGHTS_NAME
        from stages.core.runtime import resolve_device

        device = resolve_device(device)
        model, model_params = load_model(model_dir, device)
        fingerprint = model_fingerprint(Path(model_dir) / WEIGHTS_NAME)
        index = GalleryIndex.load(Path(index_dir), fingerprint, verify=verify)
        return cls(model, model_params.image_size, index, device, fingerprint)

    def embed(self, images: Sequence[str | Path]) -> np.ndarray:
        """N x D (N x K x D for a set head) embeddings of image files or folders of them."""
        return embed_images(self.model, self.image_size, image_files(images), self.device)

    def embed_to_parquet(self, images: Sequence[str | Path], out: str | Path) -> int:
        """Write the embeddings of image files or folders to ``out`` (path, embedding as D or K x D floats;
        the model's fingerprint and the shape in the metadata); how many images."""
        import pyarrow as pa

        from stages.core.tables import embedding_array, write_parquet

        files = image_files(images)
        emb = embed_images(self.model, self.image_size, files, self.device)
        column = embedding_array(emb)
        table = pa.table({"path": [str(f) for f in files], "embedding": column})
        schema = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("embedding", column.type)])
        meta = {"model_sha256": self.fingerprint, "shape": list(emb.shape), "similarity": self.index.similarity.name}
        write_parquet(Path(out), table, schema, meta)
        return len(files)

    def search(self, embeddings: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and gallery rows (Q x k, best first) for query embeddings."""
        return self.index.search(embeddings, k)

    def search_files(self, images: Sequence[str | Path], k: int = 10) -> list[tuple[Path, list[dict[str, Any]]]]:
        """Each query file with its k best gallery items: rank, score, class, path."""
        check_k(k, len(self.index))
        files = image_files(images)
        scores, rows = self.search(embed_images(self.model, self.image_size, files, self.device), k)
        return list(zip(files, self.index.results(scores, rows), strict=True))


def search_picture(results: Sequence[tuple[Any, list[dict[str, Any]]]], path: Path, text_queries: bool) -> None:
    """The queries (images or captions) with their results as thumbnails, named by class or caption."""
    from stages.core.evaluation import report

    def load(file: Any) -> np.ndarray:
        from PIL import Image

        from stages.core.data.torch_dataset import to_rgb

        try:
            with Image.open(file) as im:
                return report.thumbnail(to_rgb(im))
        except (OSError, ValueError):  # a precomputed-feature "image" has no picture: a grey square
            return np.full((64, 64, 3), 230, dtype=np.uint8)

    if text_queries:
        rows = [(query, [load(r["path"]) for r in found], [None] * len(found)) for query, found in results]
        report.plot_imagetext([], rows, path)
        return
    gallery = [
        report.GalleryRow(
            query=load(query),
            query_name=Path(query).name,
            neighbours=[load(r["path"]) for r in found],
            neighbour_names=[r["class_name"] for r in found],
            correct=[None] * len(found),
        )
        for query, found in results
    ]
    report.plot_gallery(gallery, path)
