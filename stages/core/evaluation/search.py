"""Exact k-nearest-neighbour search, found by the similarity a head states (its :class:`SimilaritySpec`).

``cosine``: an exact faiss inner-product index over unit rows (on a GPU when faiss-gpu sees one);
``smooth_chamfer``: the certified set search of :mod:`stages.core.evaluation.set_search`. The registry is
filled here, explicitly, so importing it imports both implementations and nothing imports back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stages.core.evaluation.set_search import SmoothChamferSearch
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.registry import Registry

# faiss-gpu cannot select more than this many neighbours per query; larger searches run on the CPU.
GPU_MAX_K = 2048

# search(queries, k, depth=None) -> (scores, ids), each len(queries) x k, best first. ``depth`` (one int
# per query, <= k) says how many leading results must be exact: a metric needs only max(R, largest k) of
# each query's ranking, which lets a certified search stop early. Exact searchers ignore it.
Searcher = Callable[..., tuple[np.ndarray, np.ndarray]]
# factory(database, largest k that will be asked, **the spec's options) -> searcher over that database
SearcherFactory = Callable[..., Searcher]
SEARCHERS: Registry[SearcherFactory] = Registry("retrieval similarity")


def load_faiss() -> Any:
    """faiss, imported quietly: its loader logs a ModuleNotFoundError at INFO when it falls back from AVX-512."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    faiss = load_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@SEARCHERS.register("cosine")
def flat_ip_searcher(database: np.ndarray, max_k: int) -> Searcher:
    """Exact inner-product search over ``database``; on a GPU when faiss-gpu sees one and ``max_k`` allows."""
    faiss = load_faiss()
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    if faiss_gpu_count() > 0 and max_k <= GPU_MAX_K:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.resources = res  # the resources must outlive the GPU index

    def search(queries: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return index.search(queries, k)  # exact at every depth

    return search


@SEARCHERS.register("smooth_chamfer")
def smooth_chamfer_searcher(
    database: np.ndarray, max_k: int, *, alpha: float = 16.0, centered: bool = False, **options: float
) -> SmoothChamferSearch:
    """``options``: ``shortlist`` (first M) and ``exhaustive_fraction`` of :class:`SmoothChamferSearch`; its
    slot shortlist is an exact inner-product search (faiss)."""
    return SmoothChamferSearch(database, flat_ip_searcher, alpha=alpha, centered=centered, **options)


def searcher_for(similarity: SimilaritySpec, database: np.ndarray, max_k: int, **options: Any) -> Searcher:
    """The registered searcher of ``similarity`` over ``database`` (already in ``similarity.layout``)."""
    return SEARCHERS.get(similarity.name)(database, max_k, **similarity.options, **options)


def search_excluding_self(
    search: Searcher, queries: np.ndarray, query_ids: np.ndarray, k: int, depth: np.ndarray | None = None
) -> np.ndarray:
    """The ids of the ``k`` nearest database rows of each query, without the query's own row.

    Searches ``k + 1`` (``depth + 1`` exact) and drops the query's own id (:func:`drop_self`). Needs
    ``k + 1 <= len(database)``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, ids = search(queries, k + 1, None if depth is None else np.minimum(depth + 1, k + 1))
    return drop_self(ids, query_ids)


def drop_self(ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """``ids`` (Q x (k + 1)) without the entry that is the query's own id; a query that is not among its own
    ``k + 1`` results (many exact duplicates ahead of it) drops its last entry instead."""
    keep = ids != query_ids[:, None]
    keep[:, -1] &= ~keep.all(axis=1)
    return ids[keep].reshape(len(ids), ids.shape[1] - 1)


def nearest_neighbours(
    embeddings: np.ndarray,
    query_ids: Sequence[int] | np.ndarray,
    k: int,
    similarity: SimilaritySpec = COSINE,
) -> np.ndarray:
    """Indices (len(query_ids) x k) of each query's k nearest other rows under ``similarity``."""
    x = similarity.layout(embeddings)
    k = min(k, len(x) - 1)
    qids = np.asarray(query_ids, dtype=np.int64)
    search = searcher_for(similarity, x, k + 1)
    return search_excluding_self(search, x[qids], qids, k)


def top_k(query: np.ndarray, gallery: np.ndarray, k: int, similarity: SimilaritySpec = COSINE) -> np.ndarray:
    """Gallery ids (len(query) x k) of each query's k best, best first, by the searcher of ``similarity``."""
    q, g = similarity.layout(query), similarity.layout(gallery)
    return searcher_for(similarity, g, k)(q, k)[1]


# Rows (and columns) of one block of the symmetric self-search: two 1024 x 1024 float32 blocks, 8 MB.
SELF_BLOCK = 1024


def self_search(x: np.ndarray, k: int, block: int = SELF_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` best rows of ``x`` itself by inner product (N x k scores and ids, best first, the
    row itself included as it scores), exactly as a flat index searched with all rows would give them.

    The similarity is symmetric, so only the blocks of the upper triangle are multiplied: block (I, J)
    updates the running top-k of rows I with S and of rows J with S^T, half the arithmetic of a full
    search. The running top-k are faiss' own heaps, fed every row's candidates in increasing id order as a
    flat index feeds them, so exact ties keep the lower id as they do there."""
    import torch

    faiss = load_faiss()
    n = len(x)
    k = min(k, n)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = n, k
    heaps.val, heaps.ids = faiss.swig_ptr(scores), faiss.swig_ptr(ids)
    heaps.heapify()
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for i0 in range(0, n, block):
        xi = rows[i0 : i0 + block]
        for j0 in range(i0, n, block):
            s = (xi @ rows[j0 : j0 + block].T).numpy()
            heaps.addn(s.shape[1], faiss.swig_ptr(s), j0, i0, s.shape[0])
            if j0 > i0:
                t = np.ascontiguousarray(s.T)
                heaps.addn(t.shape[1], faiss.swig_ptr(t), i0, j0, t.shape[0])
    heaps.reorder()
    return scores, ids
