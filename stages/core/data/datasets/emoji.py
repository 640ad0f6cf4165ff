"""Emoji, the embedded default: ~1,900 semantically named concepts, each drawn by 3-4 vendors' artists.

Everything comes from npm packages, fetched with the ordinary npm client (``npm pack``, which downloads
a tarball without installing it) and checked against pinned SHA-512 digests: the 64 px PNGs of
``emoji-datasource-{google,twitter,facebook,apple}`` 16.0.0 and the CLDR short names of
``emojibase-data`` 17.0.0. ``emoji.json``'s ``name`` is the Unicode character name ("WHITE LEFT
POINTING BACKHAND INDEX"), not what people call the emoji, so class names are emojibase's ``label``
("backhand index pointing left"), joined on the code point sequence.

A class is one top-level emoji (skin-tone variants are not classes; the "Component" category, skin
tones and hair styles, is left out) with images from at least :data:`MIN_VENDORS` vendors; its
super-class is its Unicode subcategory. The class split is a seeded random one
(``dataset.split_seed``): sorted by name, every "flag: ..." class would land on one side.

Licences of the art: Google (Noto) Apache 2.0; Twitter (Twemoji) CC BY 4.0; Apple, (c) Apple Inc., not
licensed for commercial use; Facebook, (c) Facebook Inc., no clear licence. emoji-datasource and
emojibase-data themselves are MIT. The packages' LICENSE and README files are kept in ``licenses/``.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    FETCHERS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    choose_train_classes,
    require_root,
    seeded_class_split,
)
from stages.core.errors import LangdmlError
from stages.core.io import replace_directory, staging_directory, write_json
from stages.core.npm import Package, npm_pack

log = logging.getLogger(__name__)


VENDORS = ("google", "twitter", "facebook", "apple")
MIN_VENDORS = 3
IMAGE_SIZE = 64
SOURCES = {
    "google": Package(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),
    "twitter": Package(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
    "facebook": Package(
        "emoji-datasource-facebook",
        "16.0.0",
        "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
    ),
    "apple": Package(
        "emoji-datasource-apple",
        "16.0.0",
        "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
    ),
    "emojibase": Package(
        "emojibase-data",
        "17.0.0",
        "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
}
EMOJI_JSON = "emoji.json"
LABELS_JSON = "emojibase-data.json"
RECEIPT = "SOURCE.json"
AGAIN = "run `dvc repro` (or `langdml fetch-data`) again"


def _members(tarball: Path, wanted: dict[str, str], prefix: tuple[str, str] | None, out: Path) -> int:
    """Copy the members named in ``wanted`` (member -> relative target) and, when ``prefix`` is
    ``(member folder, target folder)``, every PNG directly in that folder; how many files were written.
    Targets are built here, never taken from the archive, so no member can write outside ``out``."""
    n = 0
    found: set[str] = set()
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name in wanted:
                    target = out / wanted[member.name]
                    found.add(member.name)
                elif prefix and member.name.startswith(prefix[0]) and member.name.endswith(".png"):
                    stem = member.name[len(prefix[0]) :]
                    if "/" in stem or not stem:
                        continue
                    target = out / prefix[1] / stem
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                target.write_bytes(source.read() if source is not None else b"")
                n += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise LangdmlError(
            f"emoji: cannot unpack {tarball.name} ({err}); the download is damaged: run `dvc repro` again"
        ) from None
    missing = sorted(set(wanted) - found)
    if missing:
        raise LangdmlError(f"emoji: {tarball.name} lacks {', '.join(missing)}; is it the right package version?")
    return n


def _receipt() -> dict[str, str]:
    return {p.spec: p.integrity for p in SOURCES.values()}


@FETCHERS.register("emoji")
def fetch_emoji(root: Path) -> Path:
    """Put the emoji images and metadata into ``root`` (kept when its receipt names the same packages).

    Everything is unpacked into a temporary folder beside ``root`` and swapped in when complete, so a
    failed or interrupted fetch leaves the previous folder (or none), never a half-filled one.
    """
    root = Path(root)
    receipt = root / RECEIPT
    if receipt.is_file():
        try:
            if json.loads(receipt.read_text()) == _receipt():
                log.info("emoji: %s is complete (%s)", root, RECEIPT)
                return root
        except (OSError, json.JSONDecodeError):
            pass
        log.info("emoji: %s holds other package versions; fetching again", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with staging_directory(root, "npm") as downloads, staging_directory(root) as staging:
        out = staging / "emoji"
        for vendor in VENDORS:
            package = SOURCES[vendor]
            tarball = npm_pack(package, downloads, "emoji", AGAIN)
            wanted = {
                "package/LICENSE": f"licenses/{package.name}.LICENSE",
                "package/README.md": f"licenses/{package.name}.README.md",
            }
            if vendor == VENDORS[0]:
                wanted["package/emoji.json"] = EMOJI_JSON
            n = _members(tarball, wanted, (f"package/img/{vendor}/{IMAGE_SIZE}/", vendor), out)
            log.info("emoji: %d files from %s", n, package.spec)
            tarball.unlink()
        labels = SOURCES["emojibase"]
        tarball = npm_pack(labels, downloads, "emoji", AGAIN)
        _members(
            tarball,
            {"package/en/data.json": LABELS_JSON, "package/LICENSE": f"licenses/{labels.name}.LICENSE"},
            None,
            out,
        )
        write_json(out / RECEIPT, _receipt())
        replace_directory(out, root)
    return root


@dataclass(frozen=True)
class Concept:
    label: str
    subcategory: str
    images: tuple[str, ...]  # "<vendor>/<file>", relative to the root
    tags: tuple[str, ...] = ()  # emojibase's keywords ("face", "grin", ...)


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LangdmlError(f"emoji: cannot read {path} ({err}); delete {path.parent} and run `dvc repro`") from None
    if not isinstance(data, list):
        raise LangdmlError(f"emoji: {path} is not a JSON list; delete {path.parent} and run `dvc repro`")
    return data


def concepts(root: Path) -> list[Concept]:
    """The classes in emoji.json's order: top-level, non-Component, named by emojibase, >= MIN_VENDORS images.

    An image listed by emoji.json but absent from its vendor's folder does not count toward the vendors.
    """
    entries = _read_json(root / EMOJI_JSON)
    labels: dict[str, str] = {}
    tags: dict[str, tuple[str, ...]] = {}
    for item in _read_json(root / LABELS_JSON):
        if isinstance(item, dict) and "hexcode" in item and "label" in item:
            code = str(item["hexcode"]).upper()
            labels[code] = str(item["label"])
            tags[code] = tuple(str(t) for t in item.get("tags") or ())
    result = []
    unnamed = 0
    absent: list[str] = []
    try:
        ordered = sorted(entries, key=lambda e: e["sort_order"])
        for entry in ordered:
            if entry["category"] == "Component":
                continue
            codes = [entry["unified"], entry.get("non_qualified")]
            code = next((c.upper() for c in codes if c and c.upper() in labels), None)
            if code is None:
                unnamed += 1
                continue
            listed = [f"{v}/{entry['image']}" for v in VENDORS if entry.get(f"has_img_{v}")]
            images = tuple(p for p in listed if (root / p).is_file())
            absent += [p for p in listed if p not in images]
            if len(images) >= MIN_VENDORS:
                result.append(Concept(labels[code].lower(), entry["subcategory"], images, tags[code]))
    except (KeyError, TypeError) as err:
        raise LangdmlError(f"emoji: {root / EMOJI_JSON} lacks the field {err}; is it emoji-datasource 16?") from None
    if unnamed:
        log.warning("emoji: %d emoji have no emojibase label and are left out", unnamed)
    if absent:
        log.warning(
            "emoji: skipped %d image(s) that emoji.json lists but %s lacks, e.g. %s; delete the folder and run "
            "`dvc repro` to fetch it anew",
            len(absent),
            root,
            absent[0],
        )
    return result


@DATASETS.register("emoji")
def emoji(params: DatasetParams) -> Manifests:
    root = require_root(params)
    if not (root / RECEIPT).is_file():
        raise LangdmlError(
            f"emoji: {root} was not filled by `langdml fetch-data` ({RECEIPT} missing); run `dvc repro` "
            "(or `langdml fetch-data`)"
        )
    found = concepts(root)
    if len(found) < 2:
        raise LangdmlError(f"emoji: only {len(found)} emoji concept(s) with {MIN_VENDORS}+ vendors in {root}")
    classes = [ClassInfo(i, c.label, c.subcategory) for i, c in enumerate(found)]
    default = seeded_class_split(len(classes), params.train_fraction, params.split_seed)
    train_ids = choose_train_classes("emoji", classes, params.train_classes, default=default)
    rows = {"train": Images([], paths=[]), "test": Images([], paths=[])}
    for class_id, concept in enumerate(found):
        split = rows["train" if class_id in train_ids else "test"]
        split.labels.extend([class_id] * len(concept.images))
        split.paths.extend(concept.images)  # type: ignore[union-attr]
    return assemble("emoji", root, classes, rows, params)
