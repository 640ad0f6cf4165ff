"""Schema, writer and reader of every cached artifact, in one place that stages, library and tests share.

Manifests (one row per image), the classes table, the ELG class embeddings, the PLG pseudo-labels
and the test embeddings are Parquet files with an explicit schema and langdml metadata (what model,
prompt, dimension and normalisation made them). A reader checks the columns it relies on, so a
foreign or outdated file is one line naming the stage that rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stages.core.errors import LangdmlError
from stages.core.tables import embedding_array, embedding_type, read_parquet, write_parquet

PathLike = str | os.PathLike[str]

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=True),
        pa.field("image_bytes", pa.binary(), nullable=True),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("super_class", pa.string(), nullable=True),
    ]
)

CLASSES_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),
        pa.field("super_class", pa.string(), nullable=True),
    ]
)


def class_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("class_id", pa.int64(), nullable=False),
            pa.field("class_name", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


def pseudolabels_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("class_id", pa.int64(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("imagenet_index", pa.int32(), nullable=False),
            pa.field("imagenet_name", pa.string(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


def test_embeddings_schema(dim: int, slots: int | None = None) -> pa.Schema:
    """One row per test image; ``embedding`` is D floats, or K x D for a set-valued model."""
    return pa.schema(
        [
            pa.field("index", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("class_name", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim, slots), nullable=False),
        ]
    )


def _read(path: PathLike, stage: str, columns: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    table, meta = read_parquet(path, stage=stage)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise LangdmlError(f"{path}: no column(s) {', '.join(missing)}; re-run `langdml {stage}`")
    return table, meta


def load_manifest(path: PathLike) -> tuple[pa.Table, Path]:
    """A manifest table and the dataset root its ``path`` column is relative to."""
    table, meta = read_parquet(path, stage="prepare")
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing or "root" not in meta:
        what = f"column(s) {', '.join(missing)}" if missing else "'root' metadata"
        raise LangdmlError(f"{path}: not a langdml manifest (no {what}); re-run `langdml prepare`")
    return table, Path(meta["root"])


def manifest_class_names(table: pa.Table) -> dict[int, str]:
    """label -> class_name of a manifest (the first name seen per label)."""
    names: dict[int, str] = {}
    for label, name in zip(table.column("label").to_pylist(), table.column("class_name").to_pylist(), strict=True):
        names.setdefault(int(label), name)
    return names


def read_classes(path: PathLike) -> tuple[list[int], list[str]]:
    """Class ids and raw names from the classes table; an empty or malformed one is a one-line error."""
    table, _ = _read(path, "prepare", ["class_id", "class_name"])
    if table.num_rows == 0:
        raise LangdmlError(f"{path} lists no classes; check the dataset and re-run `langdml prepare`")
    ids = table.column("class_id").to_pylist()
    if None in ids or len(set(ids)) != len(ids):
        raise LangdmlError(f"{path}: class_id must be unique and set; re-run `langdml prepare`")
    return [int(i) for i in ids], table.column("class_name").to_pylist()


def check_provenance(path: PathLike, meta: dict[str, Any], expected: dict[str, Any], stage: str) -> None:
    """A cache is stale when the params it was made with (its ``params`` metadata) differ from ``expected``:
    one line naming the first differing key and the stage that rebuilds it."""
    made = meta.get("params")
    rebuild = f"re-run `langdml {stage}` (or `dvc repro {stage.replace('-', '_')}`)"
    if not isinstance(made, dict):
        raise LangdmlError(f"{path} does not record the params it was made with (an older cache); {rebuild}")
    for key, want in expected.items():
        if made.get(key) != want:
            raise LangdmlError(
                f"{path} is stale: it was made with {key} = {made.get(key)!r} but params.yaml has {want!r}; {rebuild}"
            )


def write_class_embeddings(
    path: PathLike,
    ids: list[int],
    names: list[str],
    prompts: list[str],
    matrix: np.ndarray,
    metadata: dict[str, Any],
) -> None:
    table = pa.table(
        {
            "class_id": pa.array(ids, pa.int64()),
            "class_name": pa.array(names, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "embedding": embedding_array(matrix),
        }
    )
    write_parquet(path, table, class_embeddings_schema(matrix.shape[1]), metadata)


def read_class_embeddings(path: PathLike) -> tuple[pa.Table, dict[str, Any]]:
    return _read(path, "embed-text", ["class_id", "class_name", "embedding"])


def write_pseudolabels(path: PathLike, table: pa.Table, dim: int, metadata: dict[str, Any]) -> None:
    write_parquet(path, table, pseudolabels_schema(dim), metadata)


def read_pseudolabels(path: PathLike) -> tuple[pa.Table, dict[str, Any]]:
    return _read(path, "pseudo-labels", ["class_id", "rank", "imagenet_name", "embedding"])


def write_test_embeddings(
    path: PathLike, labels: np.ndarray, class_names: pa.ChunkedArray | list[str], emb: np.ndarray, metadata: dict
) -> None:
    """``emb`` N x D or N x K x D; the metadata records the shape, so nothing flattens a set silently."""
    n = emb.shape[0]
    slots = emb.shape[1] if emb.ndim == 3 else None
    table = pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "class_name": pa.array(class_names, pa.string())
            if isinstance(class_names, list)
            else class_names.cast(pa.string()),
            "embedding": embedding_array(emb),
        }
    )
    meta = {**metadata, "dim": int(emb.shape[-1]), "slots": slots}
    write_parquet(path, table, test_embeddings_schema(int(emb.shape[-1]), slots), meta)


def read_test_embeddings(path: PathLike) -> tuple[pa.Table, dict[str, Any]]:
    return _read(path, "evaluate", ["index", "label", "class_name", "embedding"])
