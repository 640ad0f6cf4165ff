"""Per-class averages of classifier outputs and their top-k entries: the math of PLG.

The classifier pass streams batches, so the average is kept as running sums per class
(C x 1000) instead of an N x 1000 matrix for every image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import softmax

from stages.core.errors import LangdmlError

Averaging = Literal["probs", "logits"]
AVERAGINGS = ("probs", "logits")


class ClassAverager:
    """Running per-class mean of softmax probabilities ("probs") or raw logits ("logits")."""

    def __init__(self, averaging: Averaging = "probs") -> None:
        if averaging not in AVERAGINGS:
            raise LangdmlError(f"averaging {averaging!r} is unknown; use one of {', '.join(AVERAGINGS)}")
        self.averaging = averaging
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}

    def update(self, outputs: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch: ``outputs`` B x K logits, ``labels`` B class ids."""
        out = np.asarray(outputs, dtype=np.float64)
        lab = np.asarray(labels).reshape(-1)
        if out.ndim != 2 or out.shape[0] != lab.shape[0]:
            raise ValueError(f"expected B x K outputs for {lab.shape[0]} labels, got shape {out.shape}")
        if self.averaging == "probs":
            out = softmax(out, axis=1)
        for label in np.unique(lab):
            rows = out[lab == label]
            key = int(label)
            if key in self._sums:
                self._sums[key] += rows.sum(0)
                self._counts[key] += rows.shape[0]
            else:
                self._sums[key] = rows.sum(0)
                self._counts[key] = rows.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(class ids ascending as int64, C x K float64 mean outputs in that order)."""
        if not self._sums:
            raise LangdmlError("no classifier outputs were collected (is the training split empty?)")
        ids = np.array(sorted(self._sums), dtype=np.int64)
        means = np.stack([self._sums[int(c)] / self._counts[int(c)] for c in ids])
        return ids, means

    @property
    def counts(self) -> dict[int, int]:
        return dict(self._counts)


def average_per_class(
    outputs: np.ndarray, labels: np.ndarray, averaging: Averaging = "probs"
) -> tuple[np.ndarray, np.ndarray]:
    """(class ids ascending, C x K mean of each class's softmax probabilities or logits)."""
    acc = ClassAverager(averaging)
    acc.update(outputs, labels)
    return acc.result()


def topk_per_class(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(C x k column indices, C x k scores) of each row's k largest entries, largest first;
    equal scores are ordered by the lower index, so the result never depends on the sort."""
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise ValueError(f"expected a C x K matrix, got shape {m.shape}")
    if not 1 <= k <= m.shape[1]:
        raise LangdmlError(f"pseudo_labels.k must be between 1 and {m.shape[1]} (the classifier's outputs), got {k}")
    order = np.argsort(-m, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(m, order, axis=1)
