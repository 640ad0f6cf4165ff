"""Stage ``imagetext_features``: frozen token features of every image file and what the text tower needs of
every caption (data/imagetext/features/; :mod:`stages.core.imagetext.features` says what and how)."""

from __future__ import annotations

from stages import paths
from stages.core.config import Params


def run(params: Params) -> None:
    from stages.core.imagetext.features import compute_features
    from stages.core.tables import read_parquet

    images, meta = read_parquet(paths.IMAGETEXT_IMAGES, "imagetext-prepare")
    captions, _ = read_parquet(paths.IMAGETEXT_CAPTIONS, "imagetext-prepare")
    compute_features(params.imagetext.features, images, captions, meta["root"], paths.IMAGETEXT_FEATURES)
