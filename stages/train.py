"""Stage ``train``: the training manifest + cached language embeddings -> the image encoder (data/model/).

Reads only the training split (no model selection on test classes), unless ``train.evaluate_every`` asks for
the official protocol's test metrics during training (data/model/test_per_epoch.json; evaluate reports their
best epoch beside the final model's). The per-epoch checkpoint (data/checkpoint/last.pt) is resumed only when
its fingerprint matches this config and inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages import paths
from stages.core.artifacts import check_provenance, load_manifest, manifest_class_names
from stages.core.config import Params
from stages.core.data.image_cache import INDEX, ImageCache, cache_side
from stages.core.data.torch_dataset import ImageDataset
from stages.core.data.train_images import CachedImages, DecodedImages, TrainImages
from stages.core.data.transforms import eval_transform
from stages.core.dml.objective import TrainPaths, train_dml
from stages.core.evaluation.per_epoch import PREFIX, per_epoch_metrics
from stages.core.io import file_digest, write_json


def processes(params: Params) -> int:
    """How many DDP processes this stage wants; above 1 the CLI relaunches it under torchrun."""
    return params.train.nproc


def run(params: Params) -> None:
    table, root = load_manifest(paths.TRAIN_MANIFEST)
    images: TrainImages = DecodedImages(lambda transform: ImageDataset(table, root, transform))
    inputs: list[Path] = [paths.TRAIN_MANIFEST]
    if params.train.image_cache.enabled:
        cache = ImageCache(paths.IMAGE_CACHE)
        expected = {
            "side": cache_side(params.train.image_cache, params.model.image_size),
            "manifest_sha256": file_digest(paths.TRAIN_MANIFEST),
        }
        check_provenance(paths.IMAGE_CACHE / INDEX, cache.meta, expected, "cache-images")
        images = CachedImages(cache)
        inputs.append(paths.IMAGE_CACHE / INDEX)
    result = train_dml(
        params.training,
        images,
        TrainPaths(
            checkpoint=paths.CHECKPOINT_FILE,
            model_dir=paths.MODEL,
            log_dir=paths.TRAIN_LOGS,
            class_embeddings=paths.CLASS_EMBEDDINGS,
            pseudolabels=paths.PSEUDOLABELS_TABLE,
        ),
        input_files=inputs,
        class_names=manifest_class_names(table),
        cache_params={
            "class_embeddings": params.class_embeddings_params(),
            "pseudolabels": params.pseudolabels_params(),
        },
        evaluation=_per_epoch(params) if params.train.evaluate_every else None,
    )
    if result.main:  # the per-epoch test metrics, if any (an empty list says there are none)
        rows = [{k: v for k, v in r.items() if k == "epoch" or k.startswith(PREFIX)} for r in result.history]
        write_json(
            paths.TEST_PER_EPOCH, {"every": params.train.evaluate_every, "epochs": [r for r in rows if len(r) > 1]}
        )


def _per_epoch(params: Params) -> Callable[[Any], Any]:
    """The per-epoch hook's maker: the test split under the evaluation transform, embedded by the model."""
    table, root = load_manifest(paths.TEST_MANIFEST)

    def make(model: Any) -> Any:
        transform = eval_transform(params.model.image_size, model.mean, model.std)
        device = next(model.parameters()).device
        return per_epoch_metrics(model, ImageDataset(table, root, transform), device=device, seed=params.seed)

    return make
