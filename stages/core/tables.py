"""Tables: Parquet with an explicit schema and langdml's key-value metadata (written atomically through
:mod:`stages.core.io`), and the Arrow codec of embedding columns (N x D vectors, N x K x D sets, never
flattened)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.errors import LangdmlError, MissingInputError, first_line
from stages.core.io import atomic_path

METADATA_KEY = b"langdml"


def embedding_type(dim: int, slots: int | None = None) -> pa.DataType:
    """Arrow type of a column of ``dim``-d float32 vectors, or of sets of ``slots`` such vectors."""
    vector = pa.list_(pa.float32(), dim)
    return vector if slots is None else pa.list_(vector, slots)


def embedding_array(array: np.ndarray) -> pa.FixedSizeListArray:
    """An N x D matrix (one vector per row) or N x K x D array (a set of K vectors per row) as an
    Arrow fixed-size-list column, nested once per dimension after the first, so a set is never
    flattened into one long vector."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an N x D or N x K x D array, got shape {a.shape}")
    column: pa.Array = pa.array(a.reshape(-1))
    for size in reversed(a.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The inverse of :func:`embedding_array`: an N x D or N x K x D float32 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = []
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, *shape)


def write_parquet(
    path: str | os.PathLike[str],
    table: pa.Table,
    schema: pa.Schema,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``table`` cast to ``schema``, with ``metadata`` stored as JSON under one key, atomically."""
    table = table.select(schema.names).cast(schema)
    meta = dict(schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(dict(metadata or {}), sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike[str], stage: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a table and its langdml metadata; a missing file names the stage that makes it."""
    p = Path(path)
    hint = f" (run `langdml {stage}` or `dvc repro {stage.replace('-', '_')}`)" if stage else ""
    if not p.is_file():
        raise MissingInputError(f"{p} does not exist{hint}")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as err:  # truncated, random bytes, not Parquet
        raise LangdmlError(f"{p} is unreadable ({first_line(err)}); rebuild it{hint or ''}") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"{}")
    return table, json.loads(raw)
