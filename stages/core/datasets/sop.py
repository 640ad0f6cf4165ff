"""Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` give the standard class split.

SOP has no per-product names, so a class is named after its super-class folder ("bicycle_final" ->
"bicycle"): many classes share a name, which is what language guidance has to work with on SOP.
"""

from __future__ import annotations

from pathlib import Path

from stages.core.datasets.base import (
    DATASETS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    require_files,
    require_root,
)
from stages.core.errors import LangdmlError
from stages.params import DatasetParams

SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def super_class_name(path: str) -> str:
    """``bicycle_final/111085122871_0.JPG`` -> ``bicycle``."""
    return path.split("/", 1)[0].removesuffix("_final")


def read_ebay(path: Path) -> tuple[list[int], list[str]]:
    """(class ids, image paths) in file order; the header and every line's shape are checked."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0] != HEADER:
        raise LangdmlError(f"sop: {path.name} must start with the header line '{' '.join(HEADER)}'")
    labels, paths = [], []
    for lineno, parts in enumerate(lines[1:], 2):
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise LangdmlError(f"sop: {path.name} line {lineno}: expected 4 fields '{' '.join(HEADER)}'")
        labels.append(int(parts[1]))
        paths.append(parts[3])
    return labels, paths


@DATASETS.register("sop")
def sop(params: DatasetParams) -> Manifests:
    if params.train_classes is not None:
        raise LangdmlError("sop: dataset.train_classes is not supported; SOP's split is fixed by Ebay_train/test.txt")
    root = require_root(params)
    require_files(root, "sop", list(SPLIT_FILES.values()), hint="dataset.root should be Stanford_Online_Products")
    rows, names = {}, {}
    for split, filename in SPLIT_FILES.items():
        labels, paths = read_ebay(root / filename)
        for y, p in zip(labels, paths, strict=True):
            name = super_class_name(p)
            if names.setdefault(y, name) != name:
                raise LangdmlError(f"sop: class {y} has images in two super-class folders ({names[y]}, {name})")
        rows[split] = Images(labels, paths=paths)
    classes = [ClassInfo(y, name, super_class=name) for y, name in sorted(names.items())]
    return assemble("sop", root, classes, rows, params)
