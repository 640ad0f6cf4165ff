"""Stage ``imagetext_prepare``: a caption dataset -> images and captions manifests (data/imagetext/prepared/)."""

from __future__ import annotations

import contextlib
import logging

from stages import paths
from stages.core.config import Params
from stages.core.data.datasets.captions import CAPTION_DATASETS, CAPTIONS_SCHEMA, IMAGES_SCHEMA
from stages.core.io import atomic_path
from stages.core.tables import write_parquet

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    d = params.imagetext.data
    built = CAPTION_DATASETS.get(d.name)(d)
    meta = {"dataset": built.dataset, "root": paths.portable_root(built.root), "holdout": d.holdout}
    with contextlib.ExitStack() as stack:  # both renamed only when both were written
        for target, table, schema in (
            (paths.IMAGETEXT_IMAGES, built.images, IMAGES_SCHEMA),
            (paths.IMAGETEXT_CAPTIONS, built.captions, CAPTIONS_SCHEMA),
        ):
            write_parquet(stack.enter_context(atomic_path(target)), table, schema, {**meta, "rows": table.num_rows})
    for split in ("train", "test"):
        images = sum(s == split for s in built.images["split"].to_pylist())
        captions = sum(s == split for s in built.captions["split"].to_pylist())
        name = "validation (held-out training images)" if split == "test" and d.holdout == "validation" else split
        log.info("prepared %s %s: %d image files, %d captions", built.dataset, name, images, captions)
