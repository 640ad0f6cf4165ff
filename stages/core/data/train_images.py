"""Where training images come from: decoded from files every epoch, or read from the decoded-image cache.

Both give :func:`stages.core.dml.objective.fit` a :class:`TrainData`: a Dataset the class-balanced batch
sampler indexes with ``(index, augmentation seed)`` items, and a function that turns a loader batch
into the model's input on the device. ``DecodedImages`` decodes and augments per item in DataLoader
workers (PIL + torchvision; any dataset size). ``CachedImages`` gathers uint8 rows of the memory-mapped
cache in the workers and crops, flips, jitters and normalises the whole batch on the device, so a GPU
step is not waiting for JPEG decoding. Both draw an item's augmentation from its seed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.core.config import AugmentParams
from stages.core.data.augment import augment_batch, draw_augmentation
from stages.core.data.image_cache import ImageCache
from stages.core.data.sampling import SeededSamples
from stages.core.data.transforms import train_transform


@dataclass(frozen=True)
class Pipeline:
    """What the model needs of its input: crop size, normalisation, augmentation."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: AugmentParams


@dataclass
class TrainData:
    dataset: Dataset
    labels: np.ndarray  # the original class id of every row
    to_device: Callable[[Any, torch.device], torch.Tensor]
    collate: Callable[[Any], Any] | None = None  # None: the DataLoader's default


class TrainImages(Protocol):
    """A source of training images: ``DecodedImages``, ``CachedImages``, or your own (e.g. a shard reader)."""

    def build(self, pipe: Pipeline) -> TrainData: ...


def move_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ready float batch to the device (channels_last on CUDA, where convolutions prefer it)."""
    fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=fmt)


class DecodedImages:
    """``make_dataset(transform)`` -> a Dataset of ``(image tensor, original class id)`` with ``labels``."""

    def __init__(self, make_dataset: Callable[[Callable[[Any], Any]], Dataset]) -> None:
        self.make_dataset = make_dataset

    def build(self, pipe: Pipeline) -> TrainData:
        base = self.make_dataset(train_transform(pipe.image_size, pipe.mean, pipe.std, pipe.augment))
        labels = np.asarray(base.labels, dtype=np.int64)
        return TrainData(SeededSamples(base, np.unique(labels)), labels, move_images)


class CachedCrops(Dataset):
    """A whole batch per call (``__getitems__``): the uint8 rows, their crop matrices and colour factors
    drawn from the items' seeds, and the dense labels."""

    def __init__(self, cache: ImageCache, pipe: Pipeline) -> None:
        self.cache = cache
        self.pipe = pipe
        self.class_ids = np.unique(cache.labels)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        index = np.array([i for i, _ in items], dtype=np.int64)
        theta, colour = draw_augmentation(
            [s for _, s in items], self.cache.sizes[index], self.pipe.augment, self.pipe.image_size
        )
        labels = np.searchsorted(self.class_ids, self.cache.labels[index])
        return (self.cache.gather(index), torch.from_numpy(theta), torch.from_numpy(colour)), torch.from_numpy(labels)


def whole_batch(batch: Any) -> Any:
    """The collate function of a Dataset that returns whole batches."""
    return batch


class DeviceAugment:
    """A cached batch -> the model's input: uint8 rows to the device, then :func:`augment_batch` there."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def __call__(self, x: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        images, theta, colour = (t.to(device, non_blocking=True) for t in x)
        jitter = colour if self.pipe.augment.color_jitter > 0 else None
        out = augment_batch(images, theta, jitter, self.pipe.image_size, self.pipe.mean, self.pipe.std)
        return move_images(out, device)


class CachedImages:
    """Training images from a cache folder written by the ``cache_images`` stage."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    def build(self, pipe: Pipeline) -> TrainData:
        return TrainData(CachedCrops(self.cache, pipe), self.cache.labels, DeviceAugment(pipe), whole_batch)
