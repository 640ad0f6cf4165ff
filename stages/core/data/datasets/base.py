"""What every dataset adapter shares: the manifest schemas, the registry, and the checks.

An adapter only knows its dataset's on-disk layout. It lists the classes and, per split, the images in
the dataset's own order; :func:`assemble` then applies ``max_per_class``, checks everything a broken
download or a hand-made folder gets wrong, skips unreadable images, and builds the Arrow tables. So the
rules (and their error messages) are the same for every dataset.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from stages.core.artifacts import CLASSES_SCHEMA, MANIFEST_SCHEMA
from stages.core.config import DatasetParams
from stages.core.errors import LangdmlError
from stages.core.language.prompts import clean_class_name
from stages.core.registry import Registry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    super_class: str | None = None


@dataclass
class Images:
    """One split's images in the dataset's own order: ``paths`` (relative to root) or encoded ``blobs``."""

    labels: list[int]
    paths: list[str] | None = None
    blobs: list[bytes] | None = None

    def __post_init__(self) -> None:
        if (self.paths is None) == (self.blobs is None):
            raise ValueError("Images needs exactly one of paths or blobs")
        if len(self.sources) != len(self.labels):
            raise ValueError("Images: labels and sources differ in length")

    @property
    def sources(self) -> list[str] | list[bytes]:
        return self.paths if self.paths is not None else self.blobs  # type: ignore[return-value]

    def take(self, keep: Sequence[int]) -> Images:
        labels = [self.labels[i] for i in keep]
        if self.paths is not None:
            return Images(labels, paths=[self.paths[i] for i in keep])
        return Images(labels, blobs=[self.blobs[i] for i in keep])  # type: ignore[index]


@dataclass
class Manifests:
    """The result of every adapter: what ``prepare`` writes, plus the root that paths are relative to."""

    dataset: str
    root: Path
    train: pa.Table
    test: pa.Table
    classes: pa.Table
    n_skipped: int = 0


Adapter = Callable[[DatasetParams], Manifests]
# Datasets that langdml can obtain itself (from a package registry): fill(root) -> root.
Fetcher = Callable[[Path], Path]

# Every module of this package registers its adapter (and fetcher, where langdml can download the dataset)
# where it defines it; the first lookup imports them all, so a new dataset is one new module here.
DATASETS: Registry[Adapter] = Registry("dataset", discover="stages.core.data.datasets")
FETCHERS: Registry[Fetcher] = Registry("fetcher", discover="stages.core.data.datasets")


def first_per_class(labels: Sequence[int], cap: int | None) -> list[int]:
    """Manifest rows kept by a per-class cap: the first ``cap`` of each label, in order (seed-free)."""
    if cap is None:
        return list(range(len(labels)))
    seen: Counter[int] = Counter()
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < cap:
            seen[y] += 1
            keep.append(i)
    return keep


def require_root(params: DatasetParams) -> Path:
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise LangdmlError(
            f"{params.name}: dataset.root '{params.root}' is not a directory; point it at the unpacked dataset"
        )
    return root.resolve()


def require_files(root: Path, dataset: str, names: Sequence[str], hint: str = "") -> None:
    """A wrong layout names every file the adapter expected, so the user can see what is off."""
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        extra = f" ({hint})" if hint else ""
        raise LangdmlError(
            f"{dataset}: {', '.join(missing)} not found in {root}; expected the official layout with "
            f"{', '.join(names)}{extra}"
        )


def _show(names: Iterable[object], limit: int = 12) -> str:
    items = [str(n) for n in names]
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def seeded_class_split(n_classes: int, train_fraction: float, seed: int | None) -> set[int]:
    """The ids of ``round(train_fraction * n)`` training classes (at least one of each side): a random
    draw seeded by ``seed``, or the first ones when ``seed`` is None (sorted order)."""
    n_train = min(max(round(train_fraction * n_classes), 1), n_classes - 1)
    if seed is None:
        return set(range(n_train))
    order = np.random.default_rng(seed).permutation(n_classes)
    return {int(i) for i in order[:n_train]}


def choose_train_classes(
    dataset: str, classes: Sequence[ClassInfo], requested: Sequence[str | int] | None, default: set[int]
) -> set[int]:
    """``dataset.train_classes`` (names or ids) or the dataset's standard split; both sides non-empty."""
    if requested is None:
        chosen = set(default)
    else:
        by_name: dict[str, list[int]] = {}
        for c in classes:
            by_name.setdefault(c.name, []).append(c.id)
        ids = {c.id for c in classes}
        chosen = set()
        for item in requested:
            if isinstance(item, int) and item in ids:
                chosen.add(item)
            elif isinstance(item, str) and item in by_name:
                chosen.update(by_name[item])
            else:
                known = _show(sorted(by_name)) if isinstance(item, str) else _show(sorted(ids))
                raise LangdmlError(f"{dataset}: dataset.train_classes: unknown class {item!r}; known: {known}")
    if not chosen:
        raise LangdmlError(f"{dataset}: no training classes; check dataset.train_classes")
    if len(chosen) == len(classes):
        raise LangdmlError(f"{dataset}: every class is a training class, none is left for testing")
    return chosen


def check_images(root: Path, paths: Sequence[str]) -> list[str | None]:
    """Fully decode each image in a thread pool (Pillow releases the GIL); the error text, or None."""
    from PIL import Image

    def check(rel: str) -> str | None:
        try:
            with Image.open(root / rel) as im:
                im.load()
        except Exception as err:  # any decoder failure means the image is unusable
            return f"{type(err).__name__}: {err}"
        return None

    workers = min(32, (os.cpu_count() or 1) * 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(check, paths, chunksize=64), total=len(paths), desc="verify images", leave=False))


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks resolved, ``..`` applied) lies under ``root`` (itself resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def check_paths(
    dataset: str, root: Path, split: str, paths: Sequence[str], file_of: Callable[[str], str] = str
) -> None:
    """The one path check of every adapter (DML and captions): no entry listed twice in a split, every file
    inside the dataset root (``..``, an absolute path and symlinks resolved), every file there.
    ``file_of`` maps an entry to its file (``train_ims.npy#17`` -> ``train_ims.npy``)."""
    counts = Counter(paths)
    dupes = [p for p, n in counts.items() if n > 1]
    if dupes:
        raise LangdmlError(
            f"{dataset}: duplicate entries: {len(dupes)} image(s) listed more than once in the "
            f"{split} split, e.g. {dupes[0]!r}"
        )
    files = sorted({file_of(p) for p in paths})
    outside = [p for p in files if not inside(root, root / p)]
    if outside:
        raise LangdmlError(
            f"{dataset}: {len(outside)} image path(s) of the {split} split lead outside dataset.root {root}, "
            f"e.g. {outside[0]!r}; every image must lie under the dataset's folder"
        )
    missing = [p for p in files if not (root / p).is_file()]
    if missing:
        raise LangdmlError(
            f"{dataset}: {len(missing)} image(s) of the {split} split do not exist under {root}, "
            f"e.g. {missing[0]!r}; is dataset.root the dataset's top folder?"
        )


def assemble(
    dataset: str,
    root: Path,
    classes: Sequence[ClassInfo],
    splits: dict[str, Images],
    params: DatasetParams,
) -> Manifests:
    """Cap, validate, drop unreadable images and build the three tables (see the module docstring)."""
    for split in SPLITS:  # paths first: a path outside the root also garbles names derived from it
        if splits[split].paths is not None:
            check_paths(dataset, root, split, splits[split].paths)
    info = {c.id: c for c in classes}
    for c in classes:  # the text encoders need a name: fail here, not one stage later
        try:
            clean_class_name(c.name)
        except LangdmlError:
            raise LangdmlError(
                f"{dataset}: class {c.id} is named {c.name!r}, which is empty once underscores and spaces are "
                "removed; rename it"
            ) from None
    if len(info) != len(classes):
        dupe = next(i for i, n in Counter(c.id for c in classes).items() if n > 1)
        raise LangdmlError(f"{dataset}: class id {dupe} is defined twice")
    split_of: dict[int, str] = {}
    for split in SPLITS:
        for y in set(splits[split].labels):
            if y not in info:
                raise LangdmlError(f"{dataset}: images of the {split} split have class id {y}, which is not defined")
            if y in split_of and split_of[y] != split:
                raise LangdmlError(
                    f"{dataset}: class {y} ({info[y].name!r}) has images in both splits; "
                    "train and test classes must be disjoint"
                )
            split_of[y] = split
    both = sorted(set(splits["train"].paths or ()) & set(splits["test"].paths or ()))
    if both:
        raise LangdmlError(f"{dataset}: duplicate entries: image {both[0]!r} is listed in both splits")
    empty = [c for c in classes if c.id not in split_of]
    if empty:
        raise LangdmlError(
            f"{dataset}: {len(empty)} class(es) have no images, e.g. {empty[0].name!r} (id {empty[0].id})"
        )
    for split in SPLITS:
        if not splits[split].labels:
            raise LangdmlError(f"{dataset}: the {split} split has no images")

    n_skipped = 0
    kept: dict[str, Images] = {}
    for split in SPLITS:
        images = splits[split]
        images = images.take(first_per_class(images.labels, params.max_per_class))
        if images.paths is not None and params.verify_images and images.paths:
            errors = check_images(root, images.paths)
            bad = [(p, e) for p, e in zip(images.paths, errors, strict=True) if e is not None]
            if bad:
                n_skipped += len(bad)
                log.warning(
                    "%s: skipped %d unreadable image(s) of the %s split, e.g. %s (%s)",
                    dataset,
                    len(bad),
                    split,
                    bad[0][0],
                    bad[0][1],
                )
                images = images.take([i for i, e in enumerate(errors) if e is None])
        kept[split] = images

    counts: Counter[int] = Counter()
    for images in kept.values():
        counts.update(images.labels)
    emptied = [c for c in classes if counts[c.id] == 0]
    if emptied:
        raise LangdmlError(
            f"{dataset}: class {emptied[0].name!r} (id {emptied[0].id}) has no readable images left "
            f"after skipping unreadable ones ({len(emptied)} such class(es)); fix or remove them"
        )

    tables = {split: _manifest_table(kept[split], info) for split in SPLITS}
    ordered = sorted(classes, key=lambda c: c.id)
    class_table = pa.table(
        {
            "class_id": [c.id for c in ordered],
            "class_name": [c.name for c in ordered],
            "split": [split_of[c.id] for c in ordered],
            "n_images": [counts[c.id] for c in ordered],
            "super_class": [c.super_class for c in ordered],
        },
        schema=CLASSES_SCHEMA,
    )
    return Manifests(dataset, root, tables["train"], tables["test"], class_table, n_skipped)


def _manifest_table(images: Images, info: dict[int, ClassInfo]) -> pa.Table:
    n = len(images.labels)
    nulls = pa.nulls(n)
    return pa.table(
        {
            "path": pa.array(images.paths, pa.string()) if images.paths is not None else nulls.cast(pa.string()),
            "image_bytes": pa.array(images.blobs, pa.binary()) if images.blobs is not None else nulls.cast(pa.binary()),
            "label": pa.array(np.asarray(images.labels, dtype=np.int64)),
            "class_name": [info[y].name for y in images.labels],
            "super_class": pa.array([info[y].super_class for y in images.labels], pa.string()),
        },
        schema=MANIFEST_SCHEMA,
    )
