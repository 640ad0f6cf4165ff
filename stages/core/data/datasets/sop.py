"""Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` give the standard class split.

SOP has no per-product names, so a class is named after its super-class folder ("bicycle_final" ->
"bicycle"): many classes share a name, which is what language guidance has to work with on SOP.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    require_files,
    require_root,
)
from stages.core.errors import LangdmlError
from stages.core.io import read_text

SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def super_class_name(paths: pl.Expr) -> pl.Expr:
    """``bicycle_final/111085122871_0.JPG`` -> ``bicycle``, on a column of paths."""
    return paths.str.split("/").list.first().str.strip_suffix("_final")


def read_ebay(path: Path) -> pl.DataFrame:
    """(class_id, path) in file order; the header and every line's shape are checked."""
    lines = [line.split() for line in read_text(path).splitlines() if line.strip()]
    if not lines or lines[0] != HEADER:
        raise LangdmlError(f"sop: {path.name} must start with the header line '{' '.join(HEADER)}'")
    for lineno, parts in enumerate(lines[1:], 2):
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise LangdmlError(f"sop: {path.name} line {lineno}: expected 4 fields '{' '.join(HEADER)}'")
    return pl.DataFrame(
        {"class_id": [int(p[1]) for p in lines[1:]], "path": [p[3] for p in lines[1:]]},
        schema={"class_id": pl.Int64, "path": pl.String},
    )


@DATASETS.register("sop")
def sop(params: DatasetParams) -> Manifests:
    if params.train_classes is not None:
        raise LangdmlError("sop: dataset.train_classes is not supported; SOP's split is fixed by Ebay_train/test.txt")
    root = require_root(params)
    require_files(root, "sop", list(SPLIT_FILES.values()), hint="dataset.root should be Stanford_Online_Products")
    splits = {split: read_ebay(root / filename) for split, filename in SPLIT_FILES.items()}
    everything = pl.concat(list(splits.values())).with_columns(super_class_name(pl.col("path")).alias("super_class"))
    folders = everything.group_by("class_id").agg(pl.col("super_class").unique(maintain_order=True)).sort("class_id")
    mixed = folders.filter(pl.col("super_class").list.len() > 1)
    if mixed.height:
        y, (a, b, *_) = mixed.row(0)
        raise LangdmlError(f"sop: class {y} has images in two super-class folders ({a}, {b})")
    classes = [ClassInfo(y, names[0], super_class=names[0]) for y, names in folders.iter_rows()]
    rows = {split: Images(df["class_id"].to_list(), paths=df["path"].to_list()) for split, df in splits.items()}
    return assemble("sop", root, classes, rows, params)
