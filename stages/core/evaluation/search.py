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

from stages.core.evaluation import lowp
from stages.core.evaluation.faiss_lib import faiss_gpu_count, load_faiss
from stages.core.evaluation.set_search import SmoothChamferSearch
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.registry import Registry

log = logging.getLogger(__name__)

# faiss-gpu cannot select more than this many neighbours per query; larger searches run on the CPU.
GPU_MAX_K = 2048

# search(queries, k, depth=None) -> (scores, ids), each len(queries) x k, best first. ``depth`` (one int
# per query, <= k) says how many leading results must be exact: a metric needs only max(R, largest k) of
# each query's ranking, which lets a certified search stop early. Exact searchers ignore it.
Searcher = Callable[..., tuple[np.ndarray, np.ndarray]]
# factory(database, largest k that will be asked, **the spec's options) -> searcher over that database
SearcherFactory = Callable[..., Searcher]
SEARCHERS: Registry[SearcherFactory] = Registry("retrieval similarity")


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


# Rows (and columns) of one block of the symmetric self-search: 4 MB of float32 scores.
SELF_BLOCK = 1024


def self_search(
    x: np.ndarray, k: int, block: int = SELF_BLOCK, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` best rows of ``x`` itself by inner product (N x k scores and ids, best first, the
    row itself included as it scores): exactly what a flat index searched with all rows gives, ids and tie
    order included (tested), with half its arithmetic. (From k = 100 faiss' flat index keeps a reservoir
    instead of heaps and orders exact ties at the k-th place its own way; the scores stay the same.)

    ``precision`` ``auto`` times this machine's products (:func:`lowp.choose_precision`, on the GPU when
    torch sees one): where bf16 / fp16 multiply at least 4x faster than float32 (the low-precision pass
    cannot use the symmetry) the certified low-precision search (:func:`lowp.certified_topk`) runs instead,
    with the same ids; ``fp32``, ``bf16``, ``fp16`` force a path.

    The similarity is symmetric, so only the blocks of the upper triangle are multiplied; block (I, J)
    feeds the heaps of rows I with S and of rows J with S^T (:func:`heaps.feed_block`, faiss' heaps as numba
    kernels, torch's thread count). Every row receives its candidates in increasing id order, as a flat
    index feeds them. On 2 CPU cores at 60k x 512 the products take ~11.5 s and the selection ~1.7 s
    (benchmarks/eval_scaling.py)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = lowp.choose_precision(device, x.shape[1], 2 * lowp.MIN_SPEEDUP)
    if precision != "fp32":
        scores, ids, fallbacks = lowp.certified_topk(x, x, k, precision, device=device)
        log.info(
            "self-search: %s first pass on %s, %d of %d rows searched in float32", precision, device, fallbacks, len(x)
        )
        return scores, ids
    import numba

    from stages.core.evaluation import heaps

    n = len(x)
    vals, ids = heaps.new_heaps(n, min(k, n))
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    threads = numba.get_num_threads()
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    try:
        for i0 in range(0, n, block):
            xi = rows[i0 : i0 + block]
            for j0 in range(i0, n, block):
                heaps.feed_block((xi @ rows[j0 : j0 + block].T).numpy(), i0, j0, j0 > i0, vals, ids)
    finally:
        numba.set_num_threads(threads)
    return heaps.best_first(vals, ids)
