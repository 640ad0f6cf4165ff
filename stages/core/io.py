"""Atomic file writes and Parquet with an explicit schema and key-value metadata.

Every stage output goes through here, so an interrupted or failing stage never leaves a
half-written file where DVC (or the next stage) would take it for a real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"langdml"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def embedding_type(dim: int) -> pa.DataType:
    """Arrow type of a column of ``dim``-d float32 vectors."""
    return pa.list_(pa.float32(), dim)


def embedding_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """An N x D float32 matrix as an Arrow fixed-size-list column (zero copy)."""
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected an N x D matrix, got shape {m.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The inverse of :func:`embedding_array`: an N x D float32 numpy matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


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
    if not p.is_file():
        hint = f" (run `langdml {stage}` or `dvc repro {stage.replace('-', '_')}`)" if stage else ""
        raise FileNotFoundError(f"{p} does not exist{hint}")
    table = pq.read_table(p)
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"{}")
    return table, json.loads(raw)
