"""Stage ``imagetext_evaluate``: image-to-text and text-to-image recall of the test split (data/imagetext/eval/)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from stages import paths
from stages.core.config import Params
from stages.core.data.datasets.captions import image_manifest, is_precomputed
from stages.core.data.torch_dataset import ImageDataset
from stages.core.errors import LangdmlError
from stages.core.evaluation.crossmodal import crossmodal_recall, crossmodal_recall_folds
from stages.core.evaluation.metrics import format_metrics
from stages.core.evaluation.report import plot_imagetext, thumbnail
from stages.core.evaluation.search import top_k
from stages.core.imagetext.model import embed_sets, load_imagetext
from stages.core.imagetext.tokens import load_token_sets
from stages.core.io import write_json
from stages.core.model.similarity import SimilaritySpec
from stages.core.runtime import resolve_device
from stages.core.tables import read_parquet

log = logging.getLogger(__name__)
SHOWN = 3  # results per query in the picture
THUMB = 64  # size of the grey stand-in for a precomputed-feature "image"


def run(params: Params) -> None:
    xm = params.imagetext
    device = resolve_device(xm.train.device)
    images, meta = read_parquet(paths.IMAGETEXT_IMAGES, "imagetext-prepare")
    captions, _ = read_parquet(paths.IMAGETEXT_CAPTIONS, "imagetext-prepare")
    img_test = np.asarray(images["split"].to_pylist()) == "test"
    cap_test = np.asarray(captions["split"].to_pylist()) == "test"
    image_ids = images["image_id"].to_numpy()[img_test]
    if len(np.unique(image_ids)) != len(image_ids):
        raise LangdmlError("the test split has several files per image id; re-run `langdml imagetext-prepare`")
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    owner = np.array([row_of[int(i)] for i in captions["image_id"].to_numpy()[cap_test]], dtype=np.int64)
    model = load_imagetext(paths.IMAGETEXT_MODEL, device)
    img = embed_sets(model.image, load_token_sets(paths.IMAGETEXT_FEATURES, "image").subset(img_test), device)
    cap = embed_sets(model.text, load_token_sets(paths.IMAGETEXT_FEATURES, "caption").subset(cap_test), device)
    ks, similarity = xm.evaluate.ks, model.similarity
    if xm.evaluate.folds:
        metrics = crossmodal_recall_folds(
            img, cap, owner, xm.evaluate.folds, ks=ks, device=str(device), similarity=similarity
        )
    else:
        metrics = crossmodal_recall(img, cap, owner, ks, device=str(device), similarity=similarity)
    metrics = {**metrics, "n_images": len(img), "n_captions": len(cap)}
    write_json(paths.IMAGETEXT_METRICS, metrics)
    log.info("cross-modal metrics: %s", format_metrics(metrics))
    texts = np.asarray(captions["text"].to_pylist(), dtype=object)[cap_test]
    _picture(params, images.filter(img_test), meta["root"], texts, img, cap, owner, similarity)


def _picture(
    params: Params,
    images: pa.Table,
    root: str,
    texts: np.ndarray,
    img: np.ndarray,
    cap: np.ndarray,
    owner: np.ndarray,
    similarity: SimilaritySpec,
) -> None:
    """A few seeded image and caption queries with their best results (``retrieval.png``)."""
    n = params.imagetext.evaluate.queries
    rng = np.random.default_rng(params.seed)
    if is_precomputed(images):  # no image files to show

        def load(row: int) -> np.ndarray:
            return np.full((THUMB, THUMB, 3), 230, dtype=np.uint8)
    else:
        dataset = ImageDataset(image_manifest(images), root, transform=None)

        def load(row: int) -> np.ndarray:
            return thumbnail(dataset.load(row))

    q_img = rng.choice(len(img), min(n, len(img)), replace=False)
    q_cap = rng.choice(len(cap), min(n, len(cap)), replace=False)
    best_caps = top_k(img[q_img], cap, min(SHOWN, len(cap)), similarity)
    best_imgs = top_k(cap[q_cap], img, min(SHOWN, len(img)), similarity)
    image_rows = [
        (load(int(q)), [str(texts[j]) for j in row], list(owner[row] == q))
        for q, row in zip(q_img, best_caps, strict=True)
    ]
    caption_rows = [
        (str(texts[q]), [load(int(j)) for j in row], list(row == owner[q]))
        for q, row in zip(q_cap, best_imgs, strict=True)
    ]
    plot_imagetext(image_rows, caption_rows, paths.IMAGETEXT_PICTURE)
