"""Similarities of two batches of embeddings, found by name (``language.similarity``, evaluation).

Each is a pure function ``(a, b) -> B1 x B2`` of L2-normalised embeddings. A set-valued similarity
(N x K x D inputs) registers here beside ``cosine``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stages.core.registry import Registry

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIMILARITIES: Registry[Similarity] = Registry("similarity")


@SIMILARITIES.register("cosine")
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of L2-normalised rows (N x D each): a plain inner product."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"cosine compares N x D batches, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a @ b.T
