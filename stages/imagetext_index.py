"""Stage ``imagetext_index``: the image-text model's test images embedded once (data/imagetext/index/), for
`langdml search --text`: their sets (N x K x D), each with its file and its first caption."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.imagetext.model import embed_sets, load_imagetext
    from stages.core.imagetext.tokens import load_token_sets
    from stages.core.model.saved import WEIGHTS_NAME
    from stages.core.runtime import resolve_device
    from stages.core.serving.index import model_fingerprint, write_index
    from stages.core.tables import read_parquet

    device = resolve_device(params.imagetext.train.device)
    images, meta = read_parquet(paths.IMAGETEXT_IMAGES, "imagetext-prepare")
    captions, _ = read_parquet(paths.IMAGETEXT_CAPTIONS, "imagetext-prepare")
    test = np.asarray(images["split"].to_pylist()) == "test"
    model = load_imagetext(paths.IMAGETEXT_MODEL, device)
    emb = embed_sets(model.image, load_token_sets(paths.IMAGETEXT_FEATURES, "image").subset(test), device)
    ids = images["image_id"].to_numpy()[test]
    first_caption: dict[int, str] = {}
    for image_id, text in zip(captions["image_id"].to_pylist(), captions["text"].to_pylist(), strict=True):
        first_caption.setdefault(int(image_id), text)
    items = pa.table(
        {
            "row": pa.array(range(len(ids)), pa.int64()),
            "path": [f"{meta['root']}/{p}" for p in np.asarray(images["path"].to_pylist(), dtype=object)[test]],
            "label": pa.array(ids, pa.int64()),
            "class_name": [first_caption.get(int(i), "") for i in ids],
        }
    )
    write_index(
        paths.IMAGETEXT_INDEX, emb, items, model_fingerprint(paths.IMAGETEXT_MODEL / WEIGHTS_NAME), model.similarity
    )
    log.info(
        "image-text index: %d test images (%s) -> %s", len(emb), " x ".join(map(str, emb.shape)), paths.IMAGETEXT_INDEX
    )
