"""faiss, loaded once and quietly, and its top-k heaps used directly (a flat index's selection and tie order)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np


def load_faiss() -> Any:
    """faiss, imported quietly: its loader logs a ModuleNotFoundError at INFO when it falls back from AVX-512."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    faiss = load_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def heap_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best of ``scores`` (m x d, with their ``ids``, ascending along each row), selected by
    faiss' own heaps as a flat index selects them, best first: the same ids and tie order."""
    faiss = load_faiss()
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out_s = np.empty((len(scores), k), dtype=np.float32)
    out_i = np.empty((len(scores), k), dtype=np.int64)
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = len(scores), k
    heaps.val, heaps.ids = faiss.swig_ptr(out_s), faiss.swig_ptr(out_i)
    heaps.heapify()
    heaps.addn_with_ids(scores.shape[1], faiss.swig_ptr(scores), faiss.swig_ptr(ids), scores.shape[1], 0, len(scores))
    heaps.reorder()
    return out_s, out_i
