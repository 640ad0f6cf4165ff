"""Stage embed_text (ELG): one frozen language embedding per class, computed once and cached by DVC.

Reads data/prepared/classes.parquet; writes data/language/class_embeddings.parquet
(class_id, class_name, prompt, embedding) for every class, train and test.
"""

from __future__ import annotations

import logging

from stages import paths
from stages.core.artifacts import read_classes, write_class_embeddings
from stages.core.config import Params
from stages.core.language.prompts import clean_class_name, embed_names

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.language.encoders import create_text_encoder
    from stages.core.runtime import resolve_device

    cfg = params.text
    ids, raw_names = read_classes(paths.CLASSES)
    names = [clean_class_name(n) for n in raw_names]
    encoder = create_text_encoder(cfg.encoder, pooling=cfg.pooling, device=resolve_device(cfg.device))
    prompts, matrix, templates = embed_names(encoder, names, cfg.templates, cfg.batch_size)
    metadata = {
        "encoder": cfg.encoder,
        "dim": encoder.dim,
        "templates": templates,
        "normalized": True,
        "pooling": cfg.pooling,
        "params": params.class_embeddings_params(),
    }
    write_class_embeddings(paths.CLASS_EMBEDDINGS, ids, raw_names, prompts, matrix, metadata)
    log.info(
        "embedded %d classes with %s (dim %d) -> %s",
        len(ids),
        cfg.encoder,
        encoder.dim,
        paths.CLASS_EMBEDDINGS,
    )
