"""Fashion-MNIST, the default: small, offline on Debian (``dataset-fashion-mnist``), and it has class names.

Images are stored in the manifest as PNG bytes, so nothing later depends on where the IDX files were.
Train classes come from the IDX train file and test classes from the t10k file, as the DML protocol
(disjoint classes) asks; the default split is even ids train, odd ids test, so both splits mix
tops, shoes and the rest.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import shutil
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import (
    DATASETS,
    FETCHERS,
    ClassInfo,
    Images,
    Manifests,
    assemble,
    choose_train_classes,
    first_per_class,
)
from stages.core.errors import LangdmlError
from stages.core.io import atomic_path

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The published MD5s of the .gz downloads (zalandoresearch/fashion-mnist README) and of their contents.
# Debian recompresses the files, so its .gz differ while the contents match; either check accepts a file.
GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_HOW_TO_GET = f"install it with `apt-get install dataset-fashion-mnist` or download the four .gz files from {URL}"


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """An IDX unsigned-byte array (magic 0x0000 08 <ndim>, big-endian int32 dims); any damage is one line."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise LangdmlError(f"{source}: not an unsigned-byte IDX file (bad magic number); {_HOW_TO_GET}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LangdmlError(f"{source}: truncated IDX header; {_HOW_TO_GET}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise LangdmlError(
            f"{source}: corrupt or truncated IDX file: dims {dims} need {expected} bytes, found {len(data)}; "
            f"{_HOW_TO_GET}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, raw: bytes | None = None) -> bytes:
    """The uncompressed content; ``raw`` is the file's bytes when the caller has read them already."""
    try:
        raw = path.read_bytes() if raw is None else raw
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise LangdmlError(f"{path}: cannot read ({err}); {_HOW_TO_GET}") from None


def _complete(directory: Path) -> dict[str, Path] | None:
    found = {name: _find(directory, name) for name in FILES}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _verify(path: Path, name: str) -> None:
    """Accept the published .gz or any file whose content has the published MD5 (Debian's recompression)."""
    raw = path.read_bytes()
    if path.suffix == ".gz" and hashlib.md5(raw).hexdigest() == GZ_MD5[name]:
        return
    if hashlib.md5(_read_bytes(path, raw)).hexdigest() != RAW_MD5[name]:
        raise LangdmlError(f"{path}: MD5 does not match the published Fashion-MNIST file; delete it and fetch again")


def _download(name: str, root: Path) -> Path:
    url = f"{URL}{name}.gz"
    target = root / f"{name}.gz"
    log.info("downloading %s", url)
    digest = hashlib.md5()
    try:
        with (
            atomic_path(target) as tmp,
            urllib.request.urlopen(url, timeout=60) as response,
            tmp.open("wb") as f,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            if digest.hexdigest() != GZ_MD5[name]:
                raise LangdmlError(f"{url}: downloaded file has the wrong MD5; try again, or {_HOW_TO_GET}")
    except (OSError, http.client.HTTPException) as err:
        raise LangdmlError(
            f"Fashion-MNIST not in {root} or {DEBIAN_DIR}, and downloading {url} failed ({err}); "
            f"{_HOW_TO_GET} into {root}"
        ) from None
    return target


@FETCHERS.register("fashion-mnist")
def fetch_fashion_mnist(root: Path) -> Path:
    """Make sure the four IDX files are in ``root``: keep verified ones, else copy Debian's, else download."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    debian = _complete(DEBIAN_DIR) if DEBIAN_DIR.is_dir() else None
    for name in FILES:
        present = _find(root, name)
        if present is not None:
            _verify(present, name)
            continue
        if debian is not None:
            _verify(debian[name], name)
            with atomic_path(root / debian[name].name) as tmp:
                shutil.copyfile(debian[name], tmp)
            log.info("copied %s from %s", debian[name].name, DEBIAN_DIR)
        else:
            _download(name, root)
    return root


def _locate(root: Path) -> tuple[Path, dict[str, Path]]:
    """``dataset.root`` if it holds all four files, else Debian's copy, else a verified download into root."""
    found = _complete(root) if root.is_dir() else None
    if found:
        return root, found
    if root.is_dir() and any(_find(root, n) for n in FILES):
        log.warning("%s holds only some of the Fashion-MNIST files; looking elsewhere", root)
    found = _complete(DEBIAN_DIR) if DEBIAN_DIR.is_dir() else None
    if found:
        log.info("using Fashion-MNIST from %s (Debian package dataset-fashion-mnist)", DEBIAN_DIR)
        return DEBIAN_DIR, found
    fetch_fashion_mnist(root)
    return root, _complete(root)  # type: ignore[return-value]


def _load_split(files: dict[str, Path], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
    images = parse_idx(_read_bytes(image_file), str(image_file))
    labels = parse_idx(_read_bytes(label_file), str(label_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise LangdmlError(
            f"{image_file.parent}: {prefix} images {images.shape} and labels {labels.shape} do not match "
            "(expected N x H x W images and N labels)"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise LangdmlError(f"{label_file}: label {labels.max()} is not a Fashion-MNIST class")
    return images, labels.astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@DATASETS.register("fashion-mnist")
def fashion_mnist(params: DatasetParams) -> Manifests:
    root, files = _locate(Path(params.root).expanduser().resolve())
    classes = [ClassInfo(i, name) for i, name in enumerate(CLASS_NAMES)]
    train_ids = choose_train_classes(
        "fashion-mnist", classes, params.train_classes, default={c.id for c in classes if c.id % 2 == 0}
    )
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _load_split(files, prefix)
        wanted = np.isin(labels, list(train_ids)) == (split == "train")
        index = np.flatnonzero(wanted)
        index = index[first_per_class(labels[index].tolist(), params.max_per_class)]
        splits[split] = Images(labels[index].tolist(), blobs=[encode_png(images[i]) for i in index])
    return assemble("fashion-mnist", root, classes, splits, params)
