"""The torch ``Dataset`` over a manifest, shared by pseudo-labelling, training and evaluation.

Images are decoded lazily in ``__getitem__`` so DataLoader workers do the work; the manifest columns
stay Arrow arrays, which forked workers share without copying (Python lists would be copied page by
page as reference counts change).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from stages.core.errors import LangdmlError


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white: a plain ``convert("RGB")`` keeps the colour of
    transparent pixels, often black, so icons (emoji, clip art) would sit on black squares."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class ImageDataset(Dataset):
    """``(transform(rgb PIL image), int label)`` per manifest row; ``labels`` is an int64 array."""

    def __init__(self, table: pa.Table, root: str | Path, transform: Callable[[Image.Image], Any] | None) -> None:
        missing = [n for n in ("path", "image_bytes", "label") if n not in table.column_names]
        if missing:
            raise LangdmlError(f"manifest lacks column(s) {', '.join(missing)}; re-run `langdml prepare`")
        self.root = Path(root)
        self.transform = transform
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self._paths = table.column("path").combine_chunks()
        self._blobs = table.column("image_bytes").combine_chunks()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """The RGB image of row ``index``; an unreadable one is a one-line error naming it."""
        blob = self._blobs[index].as_py()
        source = io.BytesIO(blob) if blob is not None else self.root / self._paths[index].as_py()
        try:
            with Image.open(source) as im:
                return to_rgb(im)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            where = f"row {index} (embedded bytes)" if blob is not None else str(source)
            raise LangdmlError(f"cannot read image {where}: {err}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])
