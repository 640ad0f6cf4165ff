"""CUB-200-2011 in its official layout; the DML protocol trains on classes 1-100 and tests on 101-200."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    choose_train_classes,
    require_files,
    require_root,
)
from stages.core.errors import LangdmlError
from stages.core.io import read_text

log = logging.getLogger(__name__)

FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "images")
N_TRAIN_CLASSES = 100


def read_id_table(path: Path, dataset: str) -> dict[int, str]:
    """``<int id> <value>`` per line (the CUB annotation format); a malformed or repeated id is an error."""
    table: dict[int, str] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise LangdmlError(f"{dataset}: {path.name} line {lineno}: expected '<id> <value>', got {line!r}")
        if int(key) in table:
            raise LangdmlError(f"{dataset}: duplicate entries: id {key} appears twice in {path.name}")
        table[int(key)] = value.strip()
    return table


def class_name(folder: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``: words the text encoder understands."""
    return folder.partition(".")[2].replace("_", " ") if "." in folder else folder.replace("_", " ")


@DATASETS.register("cub200")
def cub200(params: DatasetParams) -> Manifests:
    root = require_root(params)
    require_files(root, "cub200", FILES, hint="dataset.root should be the CUB_200_2011 folder")
    paths = read_id_table(root / "images.txt", "cub200")
    labels = read_id_table(root / "image_class_labels.txt", "cub200")
    folders = read_id_table(root / "classes.txt", "cub200")
    classes = [ClassInfo(cid, class_name(folder)) for cid, folder in sorted(folders.items())]
    if not all(v.isdigit() for v in labels.values()):
        raise LangdmlError("cub200: image_class_labels.txt must hold '<image id> <class id>' lines")
    # images.txt order is kept (maintain_order): it decides which images a max_per_class cap keeps.
    images = pl.DataFrame(
        {"image_id": list(paths), "path": list(paths.values())}, schema_overrides={"image_id": pl.Int64}
    )
    image_labels = pl.DataFrame(
        {"image_id": list(labels), "label": [int(v) for v in labels.values()]},
        schema={"image_id": pl.Int64, "label": pl.Int64},
    )
    table = images.join(image_labels, on="image_id", how="left", maintain_order="left")
    unlabeled = table.filter(pl.col("label").is_null())
    if unlabeled.height:
        first = unlabeled["image_id"].min()
        raise LangdmlError(f"cub200: image id {first} of images.txt has no line in image_class_labels.txt")
    if len(folders) != 200:
        log.warning("cub200: %d classes instead of 200; the split still follows the official ids", len(folders))
    train_ids = choose_train_classes(
        "cub200", classes, params.train_classes, default={c.id for c in classes if c.id <= N_TRAIN_CLASSES}
    )
    table = table.with_columns(pl.col("label").is_in(sorted(train_ids)).alias("train"))
    rows = {
        split: Images(part["label"].to_list(), paths=[f"images/{p}" for p in part["path"]])
        for split, part in (("train", table.filter(pl.col("train"))), ("test", table.filter(~pl.col("train"))))
    }
    return assemble("cub200", root, classes, rows, params)
