"""Query images given by path: each decoded as evaluation does (the evaluation transform), embedded by the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stages.core.data.torch_dataset import ImageDataset
from stages.core.data.transforms import eval_transform
from stages.core.errors import LangdmlError
from stages.core.evaluation.embedding import embed_dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted); a missing path or an empty folder is one line."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise LangdmlError(f"{path}: no image files in this folder")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise LangdmlError(f"{path}: no such file or folder")
    if not out:
        raise LangdmlError("no query images given")
    return out


def gallery_table(gallery: str) -> tuple[pa.Table, Path]:
    """The gallery of ``index.gallery`` as a manifest-like table (path, image_bytes, label, class_name) and its
    root: a manifest (.parquet; the test split's by default) or a folder of images (class = the file's folder).
    Every image lies inside its root (a manifest's dataset root, or the folder; ``..``, absolute paths and
    symlinks resolved), by the datasets' own check: the first one outside is one line."""
    from stages.core.artifacts import load_manifest
    from stages.core.data.datasets.base import check_paths, inside

    source = Path(gallery)
    if source.suffix == ".parquet":
        table, root = load_manifest(source)
        listed = [p for p in table.column("path").to_pylist() if p is not None]
        check_paths("index.gallery", root, "gallery", listed)
        return table, root
    files = image_files([source])
    outside = [f for f in files if not inside(source, f)]
    if outside:
        raise LangdmlError(
            f"index.gallery: {len(outside)} image(s) of the folder {source} lead outside it (symlinks resolved), "
            f"e.g. {outside[0]}; copy the images into the folder instead of linking them"
        )
    return files_table(files, [f.parent.name for f in files]), Path("/")


def files_table(files: Sequence[Path], class_names: Sequence[str] | None = None) -> pa.Table:
    """Image files as a manifest-like table (absolute paths, no bytes; labels numbered by sorted class name)."""
    names = list(class_names) if class_names is not None else [""] * len(files)
    label = {name: i for i, name in enumerate(sorted(set(names)))}
    return pa.table(
        {
            "path": [str(Path(f).resolve()) for f in files],
            "image_bytes": pa.nulls(len(files), pa.binary()),
            "label": pa.array([label[n] for n in names], pa.int64()),
            "class_name": names,
        }
    )


def embed_table(
    model: Any,
    image_size: int,
    table: pa.Table,
    root: str | Path,
    device: Any,
    batch_size: int = 64,
    num_workers: int = 0,
) -> np.ndarray:
    """N x D (or N x K x D) embeddings of a manifest's images, decoded as evaluation decodes them; an
    unreadable one is one line naming it."""
    dataset = ImageDataset(table, root, eval_transform(image_size, model.mean, model.std))
    return embed_dataset(model, dataset, batch_size=batch_size, num_workers=num_workers, device=device)


def evaluated_embeddings(gallery: str, embeddings: Path, weights: Path) -> np.ndarray | None:
    """The evaluate stage's embeddings of ``gallery`` when they are exactly what embedding it again would give:
    the same manifest file (SHA-256), the same weights (SHA-256), float32. Else None (embed the gallery)."""
    from stages.core.artifacts import read_test_embeddings
    from stages.core.io import file_digest
    from stages.core.tables import embedding_matrix

    source = Path(gallery)
    if source.suffix != ".parquet" or not source.is_file() or not embeddings.is_file() or not weights.is_file():
        return None
    table, meta = read_test_embeddings(embeddings)
    same = (
        meta.get("manifest_sha256") == file_digest(source)
        and meta.get("weights_sha256") == file_digest(weights)
        and meta.get("precision") == "float32"
    )
    return embedding_matrix(table.column("embedding")) if same else None


def embed_images(model: Any, image_size: int, files: Sequence[Path], device: Any, batch_size: int = 64) -> np.ndarray:
    """N x D (or N x K x D) embeddings of image files."""
    return embed_table(model, image_size, files_table(files), "/", device, batch_size)
