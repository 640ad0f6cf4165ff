"""Stage ``cache_images``: the training manifest -> the decoded-image cache (data/image_cache/).

With ``train.image_cache.enabled`` every training image is decoded once, squeezed to a
``side`` x ``side`` uint8 square and stored memory-mapped; ``train`` then crops and augments whole
batches on the device instead of decoding files every epoch. Switched off (the default: the embedded
64 px icons decode in microseconds), the folder holds only ``cache.json`` saying so.
"""

from __future__ import annotations

import logging
import time

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.artifacts import load_manifest
    from stages.core.data.image_cache import SquashResize, cache_side, write_disabled, write_image_cache
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.io import file_digest

    cp = params.train.image_cache
    if not cp.enabled:
        write_disabled(paths.IMAGE_CACHE)
        log.info("train.image_cache.enabled is false: training decodes the files (%s says so)", paths.IMAGE_CACHE)
        return
    t0 = time.perf_counter()
    table, root = load_manifest(paths.TRAIN_MANIFEST)
    side = cache_side(cp, params.model.image_size)
    summary = write_image_cache(
        ImageDataset(table, root, SquashResize(side)),
        paths.IMAGE_CACHE,
        side,
        {"manifest_sha256": file_digest(paths.TRAIN_MANIFEST)},
        num_workers=params.train.num_workers,
    )
    log.info(
        "cached %d training images at %d x %d px: %.1f MB in %.1f s",
        summary["images"],
        side,
        side,
        summary["megabytes"],
        time.perf_counter() - t0,
    )
