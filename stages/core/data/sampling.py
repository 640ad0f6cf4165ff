"""Class-balanced batches and per-item augmentation seeds: what makes an epoch reproducible.

Every batch and every per-image augmentation seed comes from a NumPy generator seeded by
(seed, epoch), so an epoch is the same whatever happened before it, whatever the worker count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)


class ClassBalancedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``batch_size / m`` distinct classes times ``m`` images (as PML's MPerClassSampler).

    Each item is ``(index, augmentation seed)``; everything is drawn from a generator seeded by
    (seed, epoch), so an epoch is reproducible from two integers, whatever happened before it. With
    ``world`` processes every rank draws the same global batch and yields its contiguous share
    (``batch_size / world`` items), so the global batches do not depend on the process count.
    """

    def __init__(
        self,
        labels: np.ndarray,
        m: int,
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        replacement: bool = False,
    ) -> None:
        """``replacement``: classes and their images drawn with replacement, as the language-guidance code's
        ``class_random_sampler.py`` does (a class may come twice in a batch, an image twice in a class's m);
        otherwise distinct classes, and distinct images where a class has m."""
        if batch_size % world:
            raise LangdmlError(f"train.batch_size ({batch_size}) must be a multiple of train.nproc ({world})")
        self.share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        self.by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        self.m = m
        self.classes_per_batch = batch_size // m
        self.num_batches = num_batches
        self.seed = seed
        self.replacement = replacement
        self.epoch = 0
        small = int((counts < m).sum())
        if small and rank == 0:
            log.info(
                "%d of %d training classes have fewer than train.samples_per_class = %d images (e.g. class %s with "
                "%d); their images repeat within a batch",
                small,
                len(classes),
                m,
                classes[np.argmax(counts < m)],
                int(counts[np.argmax(counts < m)]),
            )
        if len(classes) < self.classes_per_batch:
            raise LangdmlError(
                f"train.batch_size / train.samples_per_class = {self.classes_per_batch} classes per batch, "
                f"but the training split has only {len(classes)} classes; lower train.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.by_class), self.classes_per_batch, replace=self.replacement)
            idx = np.concatenate(
                [
                    rng.choice(self.by_class[c], self.m, replace=self.replacement or len(self.by_class[c]) < self.m)
                    for c in chosen
                ]
            )
            seeds = rng.integers(0, 2**63 - 1, size=len(idx))
            yield list(zip(idx.tolist(), seeds.tolist(), strict=True))[self.share]


class SeededSamples(Dataset):
    """``base[index]`` with torch's CPU RNG seeded per item (augmentations), labels made dense 0..C-1.

    The seed travels with the index, so results do not depend on workers or their persistence. Only
    the CPU generator is seeded (``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not restore), and it is restored after the item.
    """

    def __init__(self, base: Dataset, class_ids: np.ndarray) -> None:
        self.base = base
        self.dense = {int(c): i for i, c in enumerate(class_ids.tolist())}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            x, label = self.base[index]
        return x, self.dense[int(label)]
