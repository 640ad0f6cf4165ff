"""Any ``root/<class name>/<images>`` tree: the way to bring your own data.

Classes sorted by name get ids 0..C-1; ``round(train_fraction * C)`` of them, drawn at random with
``dataset.split_seed`` (null: the first ones by name), train and the rest test.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    IMAGE_SUFFIXES,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    choose_train_classes,
    inside,
    require_root,
    seeded_class_split,
)
from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)


def scan_class_folders(root: Path, dataset: str) -> list[tuple[str, list[str]]]:
    """(class name, sorted image paths relative to root) per non-hidden sub-folder, sorted by name.

    Symlinks that lead outside ``root`` (a linked class folder, a linked file) and dangling ones are
    skipped and counted in one log line: only what lies under the dataset's folder (what DVC tracks)
    enters a manifest.
    """
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    skipped = [p for p in entries if p.is_symlink() and (not p.exists() or not inside(root, p))]
    folders = sorted(p for p in entries if p not in skipped and p.is_dir())
    if not folders:
        raise LangdmlError(f"{dataset}: {root} has no class folders; expected root/<class name>/<image files>")
    result = []
    for folder in folders:
        files = []
        for p in folder.rglob("*"):
            if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                continue
            if p.is_symlink() and (not p.exists() or not inside(root, p)):
                skipped.append(p)
            elif p.is_file():
                files.append(p.relative_to(root).as_posix())
        files.sort()
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise LangdmlError(f"{dataset}: class folder {folder.name!r} has no image files ({suffixes})")
        result.append((folder.name, files))
    if skipped:
        log.warning(
            "%s: skipped %d symlink(s) that dangle or lead outside %s, e.g. %s",
            dataset,
            len(skipped),
            root,
            skipped[0].relative_to(root),
        )
    return result


@DATASETS.register("folder")
def folder(params: DatasetParams) -> Manifests:
    root = require_root(params)
    folders = scan_class_folders(root, "folder")
    if len(folders) < 2:
        raise LangdmlError(f"folder: {root} has {len(folders)} class folder; need at least 2 (train and test)")
    classes = [ClassInfo(i, name) for i, (name, _) in enumerate(folders)]
    default = seeded_class_split(len(classes), params.train_fraction, params.split_seed)
    train_ids = choose_train_classes("folder", classes, params.train_classes, default=default)
    rows = {"train": Images([], paths=[]), "test": Images([], paths=[])}
    for class_id, (_, files) in enumerate(folders):
        split = rows["train" if class_id in train_ids else "test"]
        split.labels.extend([class_id] * len(files))
        split.paths.extend(files)  # type: ignore[union-attr]
    return assemble("folder", root, classes, rows, params)
