"""The decoded-image cache: every training image decoded once, stored as uint8, read memory-mapped.

Layout of the cache folder (stage ``cache_images``):

- ``images.npy``: N x S x S x 3 uint8, one row per manifest row, a plain NumPy array file opened with
  ``mmap_mode="r"``. A fixed shape makes a batch one gather from the page cache: no decoding, no
  per-row (de)compression and no Arrow list offsets, and forked DataLoader workers share the pages.
  Parquet/Arrow would store the same bytes in row groups that are decompressed whole to read a few rows.
- ``index.parquet``: per row the manifest ``row``, ``label`` and the original ``width`` / ``height``;
  its metadata record the side and the digest of the manifest the cache was made from.
- ``cache.json``: a summary (also written, alone, when the cache is switched off).

Each image is resized to S x S whatever its aspect ratio (squeezed, not centre-cropped), so no part of
it is lost; the crops (:mod:`stages.core.data.augment`) are drawn in the original pixel geometry from the
stored width and height and so undo the squeeze. The long side keeps S pixels instead of S x long/short:
for very wide images, raise the side.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stages.core.config import ImageCacheParams
from stages.core.data.transforms import eval_resize
from stages.core.errors import LangdmlError
from stages.core.io import replace_directory, write_json
from stages.core.tables import read_parquet, write_parquet

log = logging.getLogger(__name__)

IMAGES = "images.npy"
INDEX = "index.parquet"


def cache_side(params: ImageCacheParams, image_size: int) -> int:
    """The stored square's side: ``train.image_cache.side``, or the evaluation resize of ``image_size``."""
    return params.side if params.side is not None else eval_resize(image_size)


SUMMARY = "cache.json"
STAGE = "cache-images"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)


class SquashResize:
    """PIL image -> (S x S x 3 uint8 array, (width, height)): the cache's transform (picklable for workers)."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        resized = image.resize((self.side, self.side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(resized, dtype=np.uint8), image.size


def _stack(items: list[tuple[tuple[np.ndarray, tuple[int, int]], int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.stack([a for (a, _), _ in items]),
        np.array([size for (_, size), _ in items], dtype=np.int32),
        np.array([label for _, label in items], dtype=np.int64),
    )


def write_image_cache(
    dataset: Dataset,
    folder: Path,
    side: int,
    provenance: dict[str, Any],
    *,
    num_workers: int = 0,
    batch_size: int = 64,
    show: bool = True,
) -> dict[str, Any]:
    """Decode every item of ``dataset`` (items ``(SquashResize output, label)``) into ``folder``;
    ``provenance`` (what the cache was made from, e.g. the manifest's digest) goes into the index metadata.

    Written into a temporary folder beside it and swapped in whole, so an interrupted run leaves the
    previous cache (or none), never a half-filled array. Returns the summary written to ``cache.json``
    (no timings: it is part of a DVC output, which must not change between identical runs).
    """
    if len(dataset) == 0:
        raise LangdmlError("the training manifest has no images to cache; re-run `langdml prepare`")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _fill(dataset, tmp, side, provenance, num_workers, batch_size, show)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, folder)
    return summary


def _fill(
    dataset: Dataset, tmp: Path, side: int, provenance: dict[str, Any], num_workers: int, batch_size: int, show: bool
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    n = len(dataset)
    array = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
    sizes = np.empty((n, 2), dtype=np.int32)
    labels = np.empty(n, dtype=np.int64)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_stack)
    at = 0
    for images, size, label in tqdm(loader, desc="caching images", disable=not show, dynamic_ncols=True):
        array[at : at + len(images)] = images
        sizes[at : at + len(images)] = size
        labels[at : at + len(images)] = label
        at += len(images)
    array.flush()
    del array
    table = pa.table(
        {"row": np.arange(n), "label": labels, "width": sizes[:, 0], "height": sizes[:, 1]}, schema=INDEX_SCHEMA
    )
    meta = {"params": {**provenance, "side": side}, "side": side, "images": n}
    write_parquet(tmp / INDEX, table, INDEX_SCHEMA, meta)
    summary = {
        "enabled": True,
        "images": n,
        "side": side,
        "megabytes": round((tmp / IMAGES).stat().st_size / 2**20, 1),
    }
    write_json(tmp / SUMMARY, summary)
    return summary


def write_disabled(folder: Path) -> None:
    """The cache switched off: the folder holds only a summary saying so (DVC needs the output)."""
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json(tmp / SUMMARY, {"enabled": False})
    replace_directory(tmp, folder)


class ImageCache:
    """A cache folder opened for reading; the array is memory-mapped lazily in each process that reads it
    (a pickled memmap would be copied into every worker)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        table, self.meta = read_parquet(self.folder / INDEX, stage=STAGE)
        missing = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
        if missing or "side" not in self.meta:
            raise LangdmlError(f"{self.folder / INDEX}: not a langdml image cache; re-run `langdml {STAGE}`")
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.sizes = np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], axis=1)
        self.side = int(self.meta["side"])
        self._images: np.ndarray | None = None
        shape = self.images.shape
        if shape != (len(self.labels), self.side, self.side, 3):
            raise LangdmlError(
                f"{self.folder / IMAGES} holds {shape}, the index {len(self.labels)} images of side {self.side}; "
                f"re-run `langdml {STAGE}`"
            )

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            path = self.folder / IMAGES
            try:
                self._images = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise LangdmlError(f"{path} is unreadable ({err}); re-run `langdml {STAGE}`") from None
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (any order, repeats allowed) as a B x S x S x 3 uint8 tensor; read in file order."""
        order = np.argsort(index, kind="stable")
        rows = np.empty((len(index), self.side, self.side, 3), dtype=np.uint8)
        rows[order] = self.images[index[order]]
        return torch.from_numpy(rows)
