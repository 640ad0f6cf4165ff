"""A gallery index of a trained model: the gallery's embeddings and items, tied to the model by fingerprint.

Layout of an index folder: ``embeddings.npy`` (N x D, or N x K x D for a set head: what the exact
smooth-Chamfer search needs), ``items.parquet`` (row, path, label, class name) and ``index.json`` (the model's
fingerprint = the SHA-256 of its weights, its similarity spec, the shape, dtype and row count, and each file's
size and SHA-256). An index proves itself before it answers (:meth:`GalleryIndex.load`): the sizes, shapes,
dtype and rows always (a stat and two headers), the content hashes with ``verify`` (`langdml search --verify`),
so a truncated, swapped or edited file is one line, never results that name the wrong images. No separate
faiss file: an exact
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

from stages.core.errors import LangdmlError, first_line
from stages.core.evaluation.search import searcher_for
from stages.core.io import file_digest, load_npy, replace_directory, save_npy, staging_directory, write_json
from stages.core.model.similarity import SimilaritySpec
from stages.core.tables import read_parquet, write_parquet

EMBEDDINGS, ITEMS, META = "embeddings.npy", "items.parquet", "index.json"
FILES = (EMBEDDINGS, ITEMS)  # what index.json proves
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
    ]
)


def check_k(k: int, gallery: int) -> None:
    """``k`` neighbours are a whole number from 1 to the gallery's size; else one line."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= gallery:
        raise LangdmlError(f"k = {k!r}: ask for 1 to {gallery} neighbours (the gallery has {gallery} items)")


def model_fingerprint(weights: Path) -> str:
    """What ties an index to the model that embedded it: the SHA-256 of the weights file."""
    return file_digest(weights)


def write_index(
    directory: Path, embeddings: np.ndarray, items: pa.Table, fingerprint: str, similarity: SimilaritySpec
) -> None:
    """Write the index folder whole (staged beside it, then swapped in), with what proves its files."""
    if len(embeddings) != items.num_rows:
        raise LangdmlError(f"{directory}: {len(embeddings)} embeddings for {items.num_rows} gallery items")
    with staging_directory(directory) as staging:
        save_npy(staging / EMBEDDINGS, np.ascontiguousarray(embeddings, dtype=np.float32))
        write_parquet(staging / ITEMS, items, ITEMS_SCHEMA, {"rows": items.num_rows})
        meta = {
            "model_sha256": fingerprint,
            "similarity": {"name": similarity.name, "alpha": similarity.alpha, "centered": similarity.centered},
            "shape": list(embeddings.shape),
            "dtype": "float32",
            "rows": items.num_rows,
            "files": {
                name: {"bytes": (staging / name).stat().st_size, "sha256": file_digest(staging / name)}
                for name in FILES
            },
        }
        write_json(staging / META, meta)
        replace_directory(staging, directory)


def _read_meta(directory: Path, stage: str) -> dict[str, Any]:
    """``index.json``, checked for every key the index needs; anything else is one line naming the stage."""
    rebuild = f"run `langdml {stage}` (or `dvc repro`)"
    meta_path = directory / META
    if not meta_path.is_file():
        raise LangdmlError(f"no index in {directory}; {rebuild}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LangdmlError(f"{meta_path}: unreadable ({first_line(err)}); {rebuild}") from None
    need = ("model_sha256", "similarity", "shape", "dtype", "rows", "files")
    missing = [k for k in need if k not in meta] if isinstance(meta, dict) else list(need)
    if missing:
        raise LangdmlError(
            f"{meta_path}: no {', '.join(missing)} (an index of an older langdml, or an edited one); {rebuild}"
        )
    try:
        SimilaritySpec(**meta["similarity"])
        files = {name: (int(meta["files"][name]["bytes"]), str(meta["files"][name]["sha256"])) for name in FILES}
        meta["dtype"], meta["rows"] = np.dtype(meta["dtype"]), int(meta["rows"])
        meta["shape"] = [int(d) for d in meta["shape"]]
    except (KeyError, TypeError, ValueError) as err:
        raise LangdmlError(f"{meta_path}: malformed ({first_line(err)}); {rebuild}") from None
    meta["files"] = files
    return meta


def verify_index(directory: Path, meta: dict[str, Any], content: bool, stage: str = "index") -> None:
    """Each file of the index is the one ``index.json`` describes: its size always, its SHA-256 with
    ``content``; a mismatch is one line naming the file."""
    for name, (size, digest) in meta["files"].items():
        path = directory / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size or (content and file_digest(path) != digest):
            what = "missing" if actual is None else f"{actual} bytes, not {size}" if actual != size else "edited"
            raise LangdmlError(
                f"{path}: not the file this index was built with ({what}); run `langdml {stage}` (or `dvc repro`)"
            )


@dataclass
class GalleryIndex:
    embeddings: np.ndarray
    items: list[dict[str, Any]]
    similarity: SimilaritySpec
    _searcher: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: Path, fingerprint: str, stage: str = "index", verify: bool = False) -> GalleryIndex:
        """The index in ``directory``, after it proves itself (module docstring; ``verify``: the content hashes
        too); one made by another model, an inconsistent one, or none is one line naming the stage."""
        rebuild = f"run `langdml {stage}` (or `dvc repro`)"
        meta = _read_meta(directory, stage)
        if meta["model_sha256"] != fingerprint:
            raise LangdmlError(
                f"{directory} was built by another model than the one in use (its weights changed since); {rebuild}"
            )
        verify_index(directory, meta, verify, stage)
        embeddings = load_npy(directory / EMBEDDINGS, rebuild, mmap_mode="r")
        if list(embeddings.shape) != meta["shape"] or embeddings.dtype != meta["dtype"]:
            raise LangdmlError(
                f"{directory / EMBEDDINGS}: {' x '.join(map(str, embeddings.shape))} {embeddings.dtype}, but the index "
                f"was built as {' x '.join(map(str, meta['shape']))} {meta['dtype']}; {rebuild}"
            )
        table, _ = read_parquet(directory / ITEMS, stage)
        n = meta["rows"]
        rows = table.column("row").to_pylist() if "row" in table.column_names else None
        if len(embeddings) != n or table.num_rows != n or rows != list(range(n)):
            raise LangdmlError(
                f"{directory}: {len(embeddings)} embeddings and {table.num_rows} items, but the index was built with "
                f"{n} of each, numbered 0..{n - 1}; {rebuild}"
            )
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
        The searcher is built on the first call and kept (a flat index copies the gallery once). Bad queries
        (another width, NaN or inf, k outside 1..len) are one :class:`LangdmlError` line."""
        check_k(k, len(self))
        queries = np.asarray(queries)
        if queries.ndim != self.embeddings.ndim or queries.shape[1:] != self.embeddings.shape[1:]:
            raise LangdmlError(
                f"query embeddings of shape {queries.shape} for a gallery of "
                f"{' x '.join(map(str, self.embeddings.shape[1:]))} embeddings: give Q x "
                f"{' x '.join(map(str, self.embeddings.shape[1:]))}"
            )
        if not np.issubdtype(queries.dtype, np.number) or not np.isfinite(queries).all():
            raise LangdmlError("query embeddings must be finite numbers (NaN or inf found)")
        if self._searcher is None:
            self._searcher = searcher_for(self.similarity, self.similarity.layout(self.embeddings), len(self))
        return self._searcher(self.similarity.layout(queries), k)
