"""Stage embed_text (ELG): one frozen language embedding per class, computed once and cached by DVC.

Reads data/prepared/classes.parquet; writes data/language/class_embeddings.parquet
(class_id, class_name, prompt, embedding) for every class, train and test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages import paths
from stages.core.errors import LangdmlError
from stages.core.io import embedding_array, embedding_type, read_parquet, write_parquet
from stages.core.prompts import clean_class_name, embed_names
from stages.params import Params

log = logging.getLogger(__name__)


def class_embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("class_id", pa.int64(), nullable=False),
            pa.field("class_name", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


def read_classes(path: str | Path = paths.CLASSES) -> tuple[list[int], list[str]]:
    """Class ids and raw names from the classes table; an empty or malformed one is a one-line error."""
    table, _ = read_parquet(path, stage="prepare")
    missing = [c for c in ("class_id", "class_name") if c not in table.column_names]
    if missing:
        raise LangdmlError(f"{path}: no column(s) {', '.join(missing)}; re-run `langdml prepare`")
    if table.num_rows == 0:
        raise LangdmlError(f"{path} lists no classes; check the dataset and re-run `langdml prepare`")
    ids = table.column("class_id").to_pylist()
    if None in ids or len(set(ids)) != len(ids):
        raise LangdmlError(f"{path}: class_id must be unique and set; re-run `langdml prepare`")
    return [int(i) for i in ids], table.column("class_name").to_pylist()


def run(params: Params) -> None:
    from stages.core.runtime import resolve_device
    from stages.core.text import create_text_encoder

    cfg = params.text
    ids, raw_names = read_classes(paths.CLASSES)
    names = [clean_class_name(n) for n in raw_names]
    encoder = create_text_encoder(cfg.encoder, pooling=cfg.pooling, device=resolve_device(cfg.device))
    prompts, matrix, templates = embed_names(encoder, names, cfg.templates, cfg.batch_size)
    table = pa.table(
        {
            "class_id": pa.array(ids, pa.int64()),
            "class_name": pa.array(raw_names, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "embedding": embedding_array(matrix),
        }
    )
    metadata = {
        "encoder": cfg.encoder,
        "dim": encoder.dim,
        "templates": templates,
        "normalized": True,
        "pooling": cfg.pooling,
    }
    write_parquet(paths.CLASS_EMBEDDINGS, table, class_embeddings_schema(encoder.dim), metadata)
    log.info(
        "embedded %d classes with %s (dim %d) -> %s",
        len(ids),
        cfg.encoder,
        encoder.dim,
        paths.CLASS_EMBEDDINGS,
    )
