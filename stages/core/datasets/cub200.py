"""CUB-200-2011 in its official layout; the DML protocol trains on classes 1-100 and tests on 101-200."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.datasets.base import (
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
from stages.params import DatasetParams

log = logging.getLogger(__name__)

FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "images")
N_TRAIN_CLASSES = 100


def read_id_table(path: Path, dataset: str) -> dict[int, str]:
    """``<int id> <value>`` per line (the CUB annotation format); a malformed or repeated id is an error."""
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
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
    unlabeled = sorted(set(paths) - set(labels))
    if unlabeled:
        raise LangdmlError(f"cub200: image id {unlabeled[0]} of images.txt has no line in image_class_labels.txt")
    if not all(v.isdigit() for v in labels.values()):
        raise LangdmlError("cub200: image_class_labels.txt must hold '<image id> <class id>' lines")
    if len(folders) != 200:
        log.warning("cub200: %d classes instead of 200; the split still follows the official ids", len(folders))
    train_ids = choose_train_classes(
        "cub200", classes, params.train_classes, default={c.id for c in classes if c.id <= N_TRAIN_CLASSES}
    )
    rows = {"train": Images([], paths=[]), "test": Images([], paths=[])}
    for image_id, rel in paths.items():
        y = int(labels[image_id])
        split = rows["train" if y in train_ids else "test"]
        split.labels.append(y)
        split.paths.append(f"images/{rel}")  # type: ignore[union-attr]
    return assemble("cub200", root, classes, rows, params)
