"""Dataset adapters (one module each, registered in ``DATASETS``), manifests and the torch Dataset.

``ImageDataset`` is loaded on first use, so listing datasets (``langdml list``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.core.datasets import cars196, cub200, fashion_mnist, folder, sop  # noqa: F401  (registers them)
from stages.core.datasets.base import (
    CLASSES_SCHEMA,
    DATASETS,
    MANIFEST_SCHEMA,
    Manifests,
    build_manifests,
    load_manifest,
)
from stages.core.datasets.fashion_mnist import fetch_fashion_mnist

if TYPE_CHECKING:
    from stages.core.datasets.torch_dataset import ImageDataset

__all__ = [
    "CLASSES_SCHEMA",
    "DATASETS",
    "MANIFEST_SCHEMA",
    "ImageDataset",
    "Manifests",
    "build_manifests",
    "fetch_fashion_mnist",
    "load_manifest",
]


def __getattr__(name: str) -> Any:
    if name == "ImageDataset":
        from stages.core.datasets.torch_dataset import ImageDataset

        return ImageDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
