"""Caption datasets for image-text retrieval (DivE's own task): images and captions, each with a split.

An adapter returns :class:`CaptionManifests`: ``images`` (one row per image file: ``image_id``,
``path`` under the root, ``split``) and ``captions`` (``caption_id``, ``image_id``, ``text``,
``split``). An image id may own several files in the train split (views of one item, drawn at random
per batch); in the test split each image id has exactly one file, so retrieval has one answer.

- ``emoji`` (the offline default, from the same npm packages as the DML default): an image is an emoji
  concept, its files the vendors' drawings (test: one vendor's); its captions are its CLDR name and its
  emojibase keywords ("grinning face"; "face, grin, grinning"). Real, curated text under MIT, images
  under the vendors' licences (README), and nothing more to download.
- ``precomp``: the precomputed-feature layout of SCAN / VSE-infinity / DivE (``{split}_ims.npy``, N x R x C
  region features, and ``{split}_caps.txt``, a fixed number of captions per image, one per line); a "file"
  is then a row of the feature file (``train_ims.npy#17``), which ``imagetext_features`` copies instead of running a
  backbone. Train is ``train``; test is ``testall`` (COCO 5K) when present, else ``test``.
- ``coco`` / ``flickr30k``: Karpathy's split files (``dataset_coco.json`` / ``dataset_flickr30k.json``)
  beside the image folders; ``restval`` joins train and ``val`` is left out, as in every paper since VSE++.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from stages.core.config.imagetext import ImageTextDataParams
from stages.core.data.datasets.base import check_images, check_paths
from stages.core.errors import LangdmlError
from stages.core.registry import Registry

log = logging.getLogger(__name__)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("caption_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
TEST_VENDOR_ORDER = ("twitter", "google", "facebook", "apple")  # CC BY and Apache art first
FEATURE_ROW = "#"  # "train_ims.npy#17": row 17 of a precomputed feature file instead of an image file


def is_precomputed(images: pa.Table) -> bool:
    """The image "files" are rows of precomputed feature files (``precomp``), not images."""
    return images.num_rows > 0 and FEATURE_ROW in images["path"][0].as_py()


def image_manifest(images: pa.Table) -> pa.Table:
    """The image files as a manifest :class:`~stages.core.data.torch_dataset.ImageDataset` reads
    (the image id as the label)."""
    return pa.table(
        {"path": images["path"], "image_bytes": pa.nulls(images.num_rows, pa.binary()), "label": images["image_id"]}
    )


@dataclass
class CaptionManifests:
    dataset: str
    root: Path
    images: pa.Table
    captions: pa.Table


CaptionAdapter = Callable[[ImageTextDataParams], CaptionManifests]
CAPTION_DATASETS: Registry[CaptionAdapter] = Registry("caption dataset")


def _file_of(path: str) -> str:
    return path.split(FEATURE_ROW)[0]


def _tables(
    name: str,
    root: Path,
    files: list[tuple[int, str, str]],
    captions: list[tuple[int, str, str]],
    source: ImageTextDataParams,
) -> CaptionManifests:
    """Check and build the two tables from (image id, path, split) and (image id, text, split) rows: paths
    confined to the root (the DML adapters' check), empty captions and (``verify_images``) unreadable image
    files left out and counted in one log line each; an image left with no file or no caption is dropped
    with its captions only if its files were unreadable, otherwise it is an error."""
    if source.holdout == "validation":
        files, captions = _validation_split(files, captions, source.validation_fraction)
    cap = source.max_images
    if cap is not None:  # a seeded random sample of each split's image ids (dataset order is often topical)
        keep: set[int] = set()
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            ids = sorted({i for i, _, s in files if s == split})
            keep.update(ids[j] for j in rng.permutation(len(ids))[:cap])
        files = [f for f in files if f[0] in keep]
        captions = [c for c in captions if c[0] in keep]
    _require_splits(name, files)
    split_of = {i: s for i, _, s in files}
    stray = [c for c in captions if c[0] not in split_of]
    if stray:
        raise LangdmlError(f"{name}: caption {stray[0][1]!r} belongs to image id {stray[0][0]}, which has no file")
    for split in ("train", "test"):
        check_paths(name, root, split, [p for _, p, s in files if s == split], file_of=_file_of)
    empty = [c for c in captions if not c[1].strip()]
    if empty:
        log.info("%s: %d empty caption(s) left out, e.g. one of image id %d", name, len(empty), empty[0][0])
        captions = [c for c in captions if c[1].strip()]
    if source.verify_images and files and FEATURE_ROW not in files[0][1]:
        errors = check_images(root, [p for _, p, _ in files])
        bad = [(f, e) for f, e in zip(files, errors, strict=True) if e is not None]
        if bad:
            (_, path, _), why = bad[0]
            log.info("%s: %d unreadable image file(s) left out, e.g. %s (%s)", name, len(bad), path, why)
            files = [f for f, e in zip(files, errors, strict=True) if e is None]
            kept = {i for i, _, _ in files}
            lost = set(split_of) - kept
            if lost:
                log.info("%s: %d image(s) without a readable file left out with their captions", name, len(lost))
                captions = [c for c in captions if c[0] in kept]
                split_of = {i: s for i, s in split_of.items() if i in kept}
            _require_splits(name, files)
    owned = {i for i, _, _ in captions}
    bare = sorted(set(split_of) - owned)
    if bare:
        raise LangdmlError(f"{name}: {len(bare)} image(s) have no caption, e.g. image id {bare[0]}")
    images = pa.table(
        {"image_id": [f[0] for f in files], "path": [f[1] for f in files], "split": [f[2] for f in files]},
        schema=IMAGES_SCHEMA,
    )
    caps = pa.table(
        {
            "caption_id": list(range(len(captions))),
            "image_id": [c[0] for c in captions],
            "text": [c[1] for c in captions],
            "split": [split_of[c[0]] for c in captions],
        },
        schema=CAPTIONS_SCHEMA,
    )
    return CaptionManifests(name, root, images, caps)


def _validation_split(
    files: list[tuple[int, str, str]], captions: list[tuple[int, str, str]], fraction: float
) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """``holdout: validation``: the test split is left out and a seeded ``fraction`` of the training image ids
    takes its place (each with the first of its files, as a test image has one), so hyper-parameters are
    chosen on held-out training images and the test split is never seen."""
    train = sorted({i for i, _, s in files if s == "train"})
    n = round(fraction * len(train))
    if not 0 < n < len(train):
        raise LangdmlError(
            f"imagetext.data.validation_fraction: {fraction} of {len(train)} training images leaves no "
            "validation or no training image; allowed: a fraction that keeps at least one of each"
        )
    held = {train[j] for j in np.random.default_rng(1).permutation(len(train))[:n]}
    kept: list[tuple[int, str, str]] = []
    placed: set[int] = set()
    for i, path, split in files:
        if split == "train" and i not in held:
            kept.append((i, path, split))
        elif split == "train" and i not in placed:
            placed.add(i)
            kept.append((i, path, "test"))
    texts = [(i, t, "test" if i in held else s) for i, t, s in captions if s == "train"]
    return kept, texts


def _require_splits(name: str, files: list[tuple[int, str, str]]) -> None:
    for split in ("train", "test"):
        if not any(s == split for _, _, s in files):
            raise LangdmlError(f"{name}: the {split} split has no images")


@CAPTION_DATASETS.register("emoji")
def emoji_captions(source: ImageTextDataParams) -> CaptionManifests:
    from stages.core.data.datasets.base import seeded_class_split
    from stages.core.data.datasets.emoji import RECEIPT, concepts

    root = Path(source.root).expanduser().resolve()
    if not (root / RECEIPT).is_file():
        raise LangdmlError(f"emoji: {root} was not filled by `langdml fetch-data`; run `dvc repro`")
    found = concepts(root)
    train = seeded_class_split(len(found), source.train_fraction, source.split_seed)
    files: list[tuple[int, str, str]] = []
    captions: list[tuple[int, str, str]] = []
    for i, concept in enumerate(found):
        split = "train" if i in train else "test"
        if split == "train":
            files += [(i, p, split) for p in concept.images]
        else:
            by_vendor = {p.split("/", 1)[0]: p for p in concept.images}
            files.append((i, next(by_vendor[v] for v in TEST_VENDOR_ORDER if v in by_vendor), split))
        texts = [concept.label]
        if concept.tags:
            keywords = ", ".join(concept.tags)
            if keywords != concept.label:
                texts.append(keywords)
        captions += [(i, t, split) for t in texts]
    return _tables("emoji", root, files, captions, source)


def _karpathy(name: str, split_file: str, folder: Callable[[dict], str]) -> CaptionAdapter:
    def adapter(source: ImageTextDataParams) -> CaptionManifests:
        root = Path(source.root).expanduser().resolve()
        path = root / split_file
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["images"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise LangdmlError(
                f"{name}: cannot read Karpathy's split file {path} ({type(err).__name__}: {err}); expected "
                f"{split_file} with an 'images' list beside the image folders"
            ) from None
        files: list[tuple[int, str, str]] = []
        captions: list[tuple[int, str, str]] = []
        splits = {"train": "train", "restval": "train", "test": "test"}
        try:
            for i, entry in enumerate(entries):
                split = splits.get(entry["split"])
                if split is None:
                    continue
                files.append((i, f"{folder(entry)}/{entry['filename']}", split))
                captions += [(i, s["raw"].strip(), split) for s in entry["sentences"]]
        except (KeyError, TypeError) as err:
            raise LangdmlError(f"{name}: {path}: image entry {i} lacks {err}; is it Karpathy's split file?") from None
        return _tables(name, root, files, captions, source)

    return adapter


CAPTION_DATASETS.register("coco")(_karpathy("coco", "dataset_coco.json", lambda e: e["filepath"]))
CAPTION_DATASETS.register("flickr30k")(_karpathy("flickr30k", "dataset_flickr30k.json", lambda e: "flickr30k-images"))


@CAPTION_DATASETS.register("precomp")
def precomp(source: ImageTextDataParams) -> CaptionManifests:
    root = Path(source.root).expanduser().resolve()
    files: list[tuple[int, str, str]] = []
    captions: list[tuple[int, str, str]] = []
    test = "testall" if (root / "testall_ims.npy").is_file() else "test"
    channels: dict[str, int] = {}
    per_split: dict[str, int] = {}
    for split, stem in (("train", "train"), ("test", test)):
        ims, caps = root / f"{stem}_ims.npy", root / f"{stem}_caps.txt"
        try:
            shape = np.load(ims, mmap_mode="r").shape
            lines = [ln.strip() for ln in caps.read_text(encoding="utf-8").splitlines()]
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise LangdmlError(
                f"precomp: cannot read {ims.name} / {caps.name} in {root} ({type(err).__name__}: {err}); expected "
                "the SCAN / VSE-infinity layout {train,test,testall}_ims.npy + _caps.txt"
            ) from None
        if len(shape) != 3 or shape[0] == 0 or len(lines) % shape[0]:
            raise LangdmlError(
                f"precomp: {ims.name} has shape {shape} and {caps.name} {len(lines)} lines; expected N x regions x "
                "channels and a whole number of captions per image"
            )
        per_image = len(lines) // shape[0]
        channels[ims.name], per_split[split] = int(shape[2]), per_image
        offset = len({i for i, _, _ in files})
        files += [(offset + r, f"{ims.name}{FEATURE_ROW}{r}", split) for r in range(shape[0])]
        captions += [(offset + j // per_image, text, split) for j, text in enumerate(lines)]
    if len(set(channels.values())) > 1:
        raise LangdmlError(
            "precomp: the splits' region features differ in width ("
            + ", ".join(f"{k}: {v} channels" for k, v in channels.items())
            + "); train and test must come from one feature extractor"
        )
    if len(set(per_split.values())) > 1:
        log.info("precomp: captions per image differ between splits: %s", per_split)
    return _tables("precomp", root, files, captions, source)
