"""Where each stage reads and writes, relative to the repository root (the same paths as dvc.yaml)."""

from __future__ import annotations

from pathlib import Path


def portable_root(root: Path) -> str:
    """The root relative to the repository when it lies inside it, else absolute.

    Manifests then hold the same bytes in every clone and in DVC's temporary experiment folders, so
    DVC sees an unchanged output instead of re-running everything downstream.
    """
    try:
        return Path(root).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(Path(root).resolve())


DATA = Path("data")

PREPARED = DATA / "prepared"
TRAIN_MANIFEST = PREPARED / "train.parquet"
TEST_MANIFEST = PREPARED / "test.parquet"
CLASSES = PREPARED / "classes.parquet"

LANGUAGE = DATA / "language"
CLASS_EMBEDDINGS = LANGUAGE / "class_embeddings.parquet"

PSEUDOLABELS = DATA / "pseudolabels"
PSEUDOLABELS_TABLE = PSEUDOLABELS / "pseudolabels.parquet"
PSEUDOLABELS_REPORT = PSEUDOLABELS / "pseudolabels.md"

IMAGE_CACHE = DATA / "image_cache"  # train.image_cache: images.npy + index.parquet + cache.json

MODEL = DATA / "model"
MODEL_WEIGHTS = MODEL / "model.safetensors"
MODEL_CONFIG = MODEL / "config.json"
TEST_PER_EPOCH = MODEL / "test_per_epoch.json"  # train.evaluate_every: the test metrics during training
CHECKPOINT = DATA / "checkpoint"
CHECKPOINT_FILE = CHECKPOINT / "last.pt"
TRAIN_LOGS = DATA / "train"

PRETRAINED_EVAL = DATA / "pretrained_eval"
PRETRAINED_METRICS = PRETRAINED_EVAL / "metrics.json"

EVAL = DATA / "eval"
METRICS = EVAL / "metrics.json"
TEST_EMBEDDINGS = EVAL / "test_embeddings.parquet"
GALLERY = EVAL / "gallery.png"
SIMILARITY = EVAL / "similarity.png"
SLOTS = EVAL / "slots.png"
RECALL_CSV = EVAL / "recall_at_k.csv"

INDEX = DATA / "index"  # the gallery embedded by the trained model, for `langdml search`

# Image-text retrieval (the cross-modal task, `imagetext-*` stages).
IMAGETEXT = DATA / "imagetext"
IMAGETEXT_PREPARED = IMAGETEXT / "prepared"
IMAGETEXT_IMAGES = IMAGETEXT_PREPARED / "images.parquet"
IMAGETEXT_CAPTIONS = IMAGETEXT_PREPARED / "captions.parquet"
IMAGETEXT_FEATURES = IMAGETEXT / "features"
IMAGETEXT_MODEL = IMAGETEXT / "model"
IMAGETEXT_CHECKPOINT = IMAGETEXT / "checkpoint"
IMAGETEXT_CHECKPOINT_FILE = IMAGETEXT_CHECKPOINT / "last.pt"
IMAGETEXT_LOGS = IMAGETEXT / "train"
IMAGETEXT_EVAL = IMAGETEXT / "eval"
IMAGETEXT_METRICS = IMAGETEXT_EVAL / "metrics.json"
IMAGETEXT_PICTURE = IMAGETEXT_EVAL / "retrieval.png"
IMAGETEXT_INDEX = IMAGETEXT / "index"  # the image-text model's test images, for `langdml search --text`
