"""Stanford Cars-196: the official ``cars_annos.mat`` + ``car_ims/`` layout, or one folder per class.

The DML protocol trains on classes 1-98 and tests on 99-196. In the folder layout the classes, sorted
by name (code-point order, as the official class list is ordered), get ids 1..196.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    choose_train_classes,
    require_root,
)
from stages.core.data.datasets.folder import scan_class_folders
from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)

ANNOTATIONS = "cars_annos.mat"
N_CLASSES = 196
N_TRAIN_CLASSES = 98


def _text(value: object) -> str:
    """A MATLAB char array as loadmat returns it (str, or a 0-d/1-element array of one) -> str."""
    while isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else "".join(str(v) for v in value.ravel())
    return str(value).strip()


def read_cars_annos(path: Path) -> tuple[list[str], list[int], list[str]]:
    """(relative image paths, 1-based class ids, class names) from the official annotation file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
        annos = np.atleast_1d(mat["annotations"])
        rel = [_text(p) for p in np.atleast_1d(annos["relative_im_path"])]
        labels = [int(c) for c in np.atleast_1d(annos["class"])]
        names = [_text(n) for n in np.atleast_1d(mat["class_names"])]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise LangdmlError(
            f"cars196: cannot read {path.name} ({type(err).__name__}: {err}); expected the official "
            "file with 'annotations' (relative_im_path, class) and 'class_names'"
        ) from None
    return rel, labels, names


def _from_mat(root: Path) -> tuple[list[ClassInfo], list[str], list[int]]:
    rel, labels, names = read_cars_annos(root / ANNOTATIONS)
    classes = [ClassInfo(i, name) for i, name in enumerate(names, 1)]
    return classes, rel, labels


def _from_folders(root: Path) -> tuple[list[ClassInfo], list[str], list[int]]:
    folders = scan_class_folders(root, "cars196")
    classes = [ClassInfo(i, name) for i, (name, _) in enumerate(folders, 1)]
    rel = [p for _, files in folders for p in files]
    labels = [i for i, (_, files) in enumerate(folders, 1) for _ in files]
    return classes, rel, labels


@DATASETS.register("cars196")
def cars196(params: DatasetParams) -> Manifests:
    root = require_root(params)
    if (root / ANNOTATIONS).is_file():
        if not (root / "car_ims").is_dir():
            raise LangdmlError(f"cars196: {root} has {ANNOTATIONS} but no car_ims/ folder; unpack car_ims.tgz there")
        classes, rel, labels = _from_mat(root)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        classes, rel, labels = _from_folders(root)
    else:
        raise LangdmlError(
            f"cars196: {root} has neither {ANNOTATIONS} with car_ims/ (official layout) nor one folder per class"
        )
    if len(classes) != N_CLASSES:
        log.warning(
            "cars196: %d classes instead of %d; the split still follows the official ids",
            len(classes),
            N_CLASSES,
        )
    train_ids = choose_train_classes(
        "cars196", classes, params.train_classes, default={c.id for c in classes if c.id <= N_TRAIN_CLASSES}
    )
    rows = {"train": Images([], paths=[]), "test": Images([], paths=[])}
    for path, y in zip(rel, labels, strict=True):
        split = rows["train" if y in train_ids else "test"]
        split.labels.append(y)
        split.paths.append(path)  # type: ignore[union-attr]
    return assemble("cars196", root, classes, rows, params)
