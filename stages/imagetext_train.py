"""Stage ``imagetext_train``: the image set head and the text tower on the cached features (data/imagetext/model/)."""

from __future__ import annotations

import logging

import numpy as np

from stages import paths
from stages.core.config import Params
from stages.core.errors import LangdmlError
from stages.core.imagetext.objective import ImageTextData, ImageTextPaths, train_imagetext
from stages.core.imagetext.tokens import TOWER_INFO, load_token_sets, load_tower_cache
from stages.core.tables import read_parquet

log = logging.getLogger(__name__)


def processes(params: Params) -> int:
    """How many DDP processes this stage wants; above 1 the CLI relaunches it under torchrun."""
    return params.imagetext.train.nproc


def run(params: Params) -> None:
    xm = params.imagetext
    images, _ = read_parquet(paths.IMAGETEXT_IMAGES, "imagetext-prepare")
    captions, _ = read_parquet(paths.IMAGETEXT_CAPTIONS, "imagetext-prepare")
    image_sets = load_token_sets(paths.IMAGETEXT_FEATURES, "image")
    caption_sets = load_token_sets(paths.IMAGETEXT_FEATURES, "caption")
    if len(image_sets) != images.num_rows or len(caption_sets) != captions.num_rows:
        raise LangdmlError("the cross-modal features do not match the manifests; re-run `langdml imagetext-features`")
    img_train = np.asarray(images["split"].to_pylist()) == "train"
    cap_train = np.asarray(captions["split"].to_pylist()) == "train"
    tower, text_arrays = load_tower_cache(paths.IMAGETEXT_FEATURES)
    data = ImageTextData(
        images=image_sets.subset(img_train),
        image_ids=images["image_id"].to_numpy()[img_train],
        captions=caption_sets.subset(cap_train),
        caption_image_ids=captions["image_id"].to_numpy()[cap_train],
        tower=tower,
        text_arrays=text_arrays,
    )
    files = [*sorted(paths.IMAGETEXT_FEATURES.glob("*.npy")), paths.IMAGETEXT_FEATURES / TOWER_INFO]
    inputs = [paths.IMAGETEXT_IMAGES, paths.IMAGETEXT_CAPTIONS, *files]
    out = ImageTextPaths(paths.IMAGETEXT_MODEL, paths.IMAGETEXT_CHECKPOINT_FILE, paths.IMAGETEXT_LOGS)
    history = train_imagetext(data, xm.model, xm.train, params.seed, out, inputs).history
    final = history[-1]["loss/triplet"] if history else float("nan")
    log.info("cross-modal model -> %s (%d epochs, final triplet loss %.4f)", out.model, len(history), final)
