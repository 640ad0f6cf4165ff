"""Tiny datasets in the real on-disk layouts, written by the tests (8x8 JPEGs, a few per class)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from stages.core.config import Params, parse_params


def params_for(name: str, root: Path | str, **dataset: object) -> Params:
    return parse_params({"dataset": {"name": name, "root": str(root), **dataset}})


def tiny_jpeg(path: Path, shade: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, 64)).save(path, "JPEG")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: opens (the header is intact) but fails to decode."""
    buf = path.parent / f".full-{path.name}"
    tiny_jpeg(buf, size=32)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


CUB_CLASSES = {
    1: "001.Black_footed_Albatross",
    2: "002.Laysan_Albatross",
    101: "101.White_Pelican",
    102: "102.Western_Wood_Pewee",
}


def make_cub(root: Path, per_class: int = 3, classes: dict[int, str] | None = None) -> Path:
    """CUB_200_2011: images.txt, image_class_labels.txt, classes.txt, images/<class folder>/<file>.

    Image ids interleave the classes, so "the dataset's own order" differs from a per-class order.
    """
    classes = classes or CUB_CLASSES
    images, labels = [], []
    image_id = 1
    for k in range(per_class):
        for cid, folder in classes.items():
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            tiny_jpeg(root / "images" / rel, shade=(cid * 7 + k) % 256)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            image_id += 1
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{cid} {f}" for cid, f in classes.items()) + "\n")
    return root


def cars_class_names(n: int = 196) -> list[str]:
    return [f"Make{i:03d} Model Sedan 2012" for i in range(1, n + 1)]


def make_cars_mat(root: Path, n_classes: int = 196) -> Path:
    """Official layout: cars_annos.mat (annotations struct array, class_names cell) and car_ims/.

    Written by scipy.io.savemat with the fields and shapes of the real file; one image per class,
    two for class 1, in interleaved order.
    """
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    order = [*range(1, n_classes + 1), 1]
    annos = np.zeros((1, len(order)), dtype=[(f, "O") for f in fields])
    for i, cid in enumerate(order):
        rel = f"car_ims/{i + 1:06d}.jpg"
        tiny_jpeg(root / rel, shade=cid)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 7, 7)]
        annos[0, i] = (rel, *box, np.array([[cid]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    names = np.empty((1, n_classes), dtype=object)
    names[0, :] = cars_class_names(n_classes)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    return root


def make_class_folders(root: Path, counts: dict[str, int], suffix: str = ".jpg") -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            tiny_jpeg(root / name / f"img_{k:03d}{suffix}", shade=(len(name) * 31 + k) % 256)
    return root


# (class_id, super_class_id, path) rows of Ebay_train.txt / Ebay_test.txt
SOP_TRAIN = [
    (1, 1, "bicycle_final/111085122871_0.JPG"),
    (1, 1, "bicycle_final/111085122871_1.JPG"),
    (2, 1, "bicycle_final/111265328556_0.JPG"),
    (3, 2, "chair_final/111500328556_0.JPG"),
]
SOP_TEST = [
    (4, 1, "bicycle_final/121015839442_0.JPG"),
    (5, 2, "chair_final/121141625436_0.JPG"),
    (5, 2, "chair_final/121141625436_1.JPG"),
]


def write_ebay(path: Path, rows: list[tuple[int, int, str]], start: int = 1) -> None:
    lines = ["image_id class_id super_class_id path"]
    lines += [f"{start + i} {cid} {sid} {p}" for i, (cid, sid, p) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def make_sop(root: Path, train=SOP_TRAIN, test=SOP_TEST) -> Path:
    for _, _, rel in [*train, *test]:
        tiny_jpeg(root / rel)
    write_ebay(root / "Ebay_train.txt", train)
    write_ebay(root / "Ebay_test.txt", test, start=len(train) + 1)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an unsigned-byte array in the IDX format (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fashion_arrays(per_class: int, seed: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
    images[:, 0, 0] = labels * 20  # so a test can tell images apart by class
    return images, labels


def make_fashion(root: Path, train_per_class: int = 4, test_per_class: int = 2, gz: bool = True) -> Path:
    """The four IDX files of Fashion-MNIST, with tiny images and every class present in both files."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per_class, seed in (("train", train_per_class, 0), ("t10k", test_per_class, 1)):
        images, labels = fashion_arrays(per_class, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


# --- emoji: npm tarballs in emoji-datasource's and emojibase-data's layouts ------------------------------

EMOJI_VENDORS = ("google", "twitter", "facebook", "apple")
# (unified, non_qualified, category, subcategory, vendors drawing it, emojibase hexcode, label)
EMOJI_ROWS = [
    ("1F600", None, "Smileys & Emotion", "face-smiling", EMOJI_VENDORS, "1F600", "grinning face"),
    ("1F913", None, "Smileys & Emotion", "face-glasses", EMOJI_VENDORS, "1F913", "nerd face"),
    ("2764-FE0F", "2764", "Smileys & Emotion", "heart", EMOJI_VENDORS, "2764", "red heart"),  # label on the
    ("1F1EF-1F1F5", None, "Flags", "country-flag", EMOJI_VENDORS, "1F1EF-1F1F5", "flag: Japan"),  # short code
    ("1F3A9", None, "Objects", "clothing", EMOJI_VENDORS[:3], "1F3A9", "top hat"),
    ("1F448", None, "People & Body", "hand-single-finger", EMOJI_VENDORS, "1F448", "backhand index pointing left"),
    ("1F436", None, "Animals & Nature", "animal-mammal", EMOJI_VENDORS[:2], "1F436", "dog face"),  # 2 vendors
    ("1F3FB", None, "Component", "skin-tone", EMOJI_VENDORS, "1F3FB", "light skin tone"),  # not a class
    ("1F355", None, "Food & Drink", "food-prepared", EMOJI_VENDORS, "1F355", "pizza"),
    ("1F680", None, "Travel & Places", "transport-air", EMOJI_VENDORS, "1F680", "rocket"),
]


def _icon(seed: int, vendor: int) -> bytes:
    """A 16 px RGBA PNG: a class-specific disc on a transparent background, drawn a bit differently per vendor."""
    import io

    rng = np.random.default_rng(seed)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    yy, xx = np.mgrid[:16, :16]
    r = 5 + vendor
    alpha = ((yy - 8) ** 2 + (xx - 8 + vendor) ** 2 <= r * r).astype(np.uint8) * 255
    rgba = np.dstack([np.full((16, 16), c, np.uint8) for c in colour] + [alpha])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_emoji_packages(directory: Path) -> dict[str, Path]:
    """The five tarballs ``npm pack`` would download, keyed by emoji.SOURCES key."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (unified, nq, category, sub, vendors, _, _) in enumerate(EMOJI_ROWS):
        entry = {"name": f"EMOJI {i}", "unified": unified, "non_qualified": nq, "image": f"{unified.lower()}.png"}
        entry.update(category=category, subcategory=sub, sort_order=i)
        entry.update({f"has_img_{v}": v in vendors for v in EMOJI_VENDORS})
        entries.append(entry)
    emoji_json = json.dumps(entries).encode()
    out = {}
    for k, vendor in enumerate(EMOJI_VENDORS):
        files = {"package/emoji.json": emoji_json, "package/LICENSE": b"MIT", "package/README.md": b"readme"}
        for i, row in enumerate(EMOJI_ROWS):
            if vendor in row[4]:
                files[f"package/img/{vendor}/64/{row[0].lower()}.png"] = _icon(i, k)
        files[f"package/img/{vendor}/64/{EMOJI_ROWS[0][0].lower()}-1f3fb.png"] = _icon(99, k)  # a skin variant
        out[vendor] = _tgz(directory / f"emoji-datasource-{vendor}-16.0.0.tgz", files)
    labels = [{"hexcode": row[5], "label": row[6], "tags": row[6].replace(":", "").split()} for row in EMOJI_ROWS]
    out["emojibase"] = _tgz(
        directory / "emojibase-data-17.0.0.tgz",
        {"package/en/data.json": json.dumps(labels).encode(), "package/LICENSE": b"MIT"},
    )
    return out


def fake_npm(bin_dir: Path, tarballs: Path) -> Path:
    """An ``npm`` that "packs" NAME@VERSION by copying NAME-VERSION.tgz from ``tarballs``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npm"
    script.write_text(
        "#!/bin/sh\n"
        'spec="$2"; dest="$4"; name="${spec%@*}"; version="${spec##*@}"\n'
        f'src="{tarballs}/$name-$version.tgz"\n'
        '[ -f "$src" ] || { echo "npm ERR! 404 Not Found - $spec" >&2; exit 1; }\n'
        'cp "$src" "$dest/"\n'
    )
    script.chmod(0o755)
    return script


PRECOMP_WORDS = ["dog", "cat", "car", "boat", "tree", "house", "bird", "horse", "train", "apple", "chair", "clock"]


def make_precomp(
    root: Path, train: int = 8, test: int = 4, per_image: int = 5, regions: int = 6, channels: int = 8
) -> Path:
    """The SCAN / VSE-infinity precomp layout (``train_ims.npy`` N x regions x channels + ``train_caps.txt``
    with ``per_image`` captions per image, ``testall_*``): image i shows one of a few concepts, its regions
    are noisy copies of the concept's vector and its captions name it in English words GloVe knows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    concepts = rng.normal(size=(len(PRECOMP_WORDS), channels)).astype(np.float32)
    offset = 0
    for split, n in (("train", train), ("testall", test)):
        kinds = (np.arange(n) + offset) % len(PRECOMP_WORDS)
        offset += n
        ims = concepts[kinds][:, None, :] + 0.3 * rng.normal(size=(n, regions, channels)).astype(np.float32)
        np.save(root / f"{split}_ims.npy", ims.astype(np.float32))
        lines = [
            f"a photo of a {PRECOMP_WORDS[k]} number {j}" if j % 2 else f"the {PRECOMP_WORDS[k]} in the picture"
            for k in kinds
            for j in range(per_image)
        ]
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return root
