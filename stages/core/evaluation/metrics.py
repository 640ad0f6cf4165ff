"""Retrieval metrics of an embedding space: Recall@k, MAP@R, R-precision and NMI.

Definitions follow "A Metric Learning Reality Check" (Musgrave et al., 2020) and the shape of
pytorch-metric-learning's ``AccuracyCalculator.get_accuracy``: queries search a gallery, and with no
gallery every query searches all the other queries (itself excluded by index, so exact duplicates
still count as neighbours); R is the number of gallery images of the query's class. Neighbours
come from the searcher of the head's similarity (:mod:`stages.core.evaluation.search`) or one passed
in, searched in query chunks so a 60k x 512 test set never needs an N x N matrix; each chunk is
reduced to per-query numbers before the next one is searched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from stages.core.errors import LangdmlError
from stages.core.evaluation.nmi import KMEANS_RESTARTS, kmeans_assign, normalized_mutual_info, pairwise_f1
from stages.core.evaluation.search import (
    SearcherFactory,
    drop_self,
    search_excluding_self,
    searcher_for,
    self_search,
)
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.vectors import l2_normalize

log = logging.getLogger(__name__)

# Neighbour entries (queries x neighbours) held at once; ~12 bytes each for faiss' ids and scores,
# plus the per-chunk label and precision arrays: about 100 MB at the default.
NEIGHBOUR_BUDGET = 2**21
MAP_DEPTH = 1000  # mAP@1000: the neighbours it reads
# Leave-one-out rows from which the symmetric self-search (half the products, numba heaps) answers sooner than a
# flat index; below it a flat index does, and numba is never imported (~0.5 s and ~100 MB on a first call).
# Measured on 2 CPU cores by benchmarks/eval_scaling.py (docs/metrics.md). Both give a flat index's neighbours,
# ids and tie order; their scores come from different BLAS calls, which may order near-ties apart (MAP@R ~1e-7).
SELF_SEARCH_MIN_ROWS = 15_000


def _validate(embeddings: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim not in (2, 3) or 0 in x.shape:
        raise LangdmlError(f"{what} embeddings must be a non-empty N x D (or N x K x D) array, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise LangdmlError(
            f"{what} labels must be one per embedding: {len(x)} embeddings but labels of shape {y.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise LangdmlError(f"{what} embeddings must be numeric, got dtype {x.dtype}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise LangdmlError(
            f"{int(bad.sum())} of {len(x)} {what} embeddings contain NaN or inf (first at row "
            f"{int(np.argmax(bad))}); the model diverged or its input is broken"
        )
    return x, y


def format_metrics(metrics: dict[str, float]) -> str:
    """One log line: rates with 4 decimals, counts as integers."""
    return ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in metrics.items())


def cosine_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``vectors`` (C x D -> C x C)."""
    v = l2_normalize(vectors)
    return v @ v.T


def class_centroids(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Mean embedding of each class in ``classes`` order (C x D); every class must occur in ``labels``."""
    present, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    sums = np.add.reduceat(np.asarray(embeddings, dtype=np.float64)[order], np.r_[0, np.cumsum(counts)[:-1]])
    wanted = np.asarray(classes)
    pos = np.minimum(np.searchsorted(present, wanted), len(present) - 1)
    missing = present[pos] != wanted
    if missing.any():
        raise ValueError(f"{int(missing.sum())} classes have no embedding, e.g. {wanted[missing][0]!r}")
    return sums[pos] / counts[pos, None]


def _chunk_scores(same: np.ndarray, r: np.ndarray, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: hits for each k (Q x len(ks)), MAP@R and R-precision, from the neighbour-match matrix."""
    k_avail = same.shape[1]
    hits = np.stack([same[:, : min(k, k_avail)].any(axis=1) for k in ks], axis=1)
    ranks = np.arange(1, k_avail + 1)
    relevant = same & (ranks[None, :] <= r[:, None])
    precision_at_i = np.cumsum(relevant, axis=1) / ranks
    # cumsum adds left to right, so the trailing columns a larger chunk k brings cannot change the rounding.
    map_r = np.cumsum(precision_at_i * relevant, axis=1)[:, -1] / r
    r_precision = relevant.sum(axis=1) / r
    return hits, map_r, r_precision


def retrieval_metrics(
    query: np.ndarray,
    gallery: np.ndarray | None = None,
    *,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    similarity: SimilaritySpec = COSINE,
    searcher: SearcherFactory | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    nmi: bool = True,
    nmi_restarts: int = KMEANS_RESTARTS,
    f1: bool = False,
    map_at_1000: bool = False,
    self_search_min_rows: int = SELF_SEARCH_MIN_ROWS,
) -> dict[str, float]:
    """Recall@k, MAP@R, R-precision and NMI of ``query`` embeddings (N x D) searching ``gallery``.

    ``gallery=None``: leave-one-out within the query set (the DML protocol). Queries whose class has
    no gallery image cannot be scored; they are counted in ``n_skipped_queries`` (``n_queries``
    counts the scored ones). ``similarity`` (the head's spec) picks the searcher (``cosine``: exact
    faiss inner product on L2-normalised rows; ``smooth_chamfer``: exact certified set search) and the
    arrays' layout; ``searcher`` replaces the searcher. N x K x D sets need a set similarity. NMI clusters
    the query embeddings into one cluster per query class (a set by the normalised mean of its slots).
    ``chunk_size`` (queries per search) defaults to what fits :data:`NEIGHBOUR_BUDGET`. Optional, as the
    language-guidance code reports them: ``f1`` (the pair-counting F1 of the same k-means clustering as NMI) and
    ``map_at_1000`` (its ``metrics/mAP_1000.py``: precision at every hit among the 1,000 nearest, summed and
    divided by the class's size, the query included). ``self_search_min_rows``: from this many rows a
    leave-one-out cosine evaluation takes the symmetric self-search instead of the flat index (the same rule for
    neighbours, ids and ties; torch's and faiss' products may round a near-tie apart, ~1e-7 of MAP@R).
    """
    xq, yq = _validate(query, query_labels, "query")
    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None:
            raise LangdmlError("gallery_labels were given without a gallery")
        xg, yg = xq, yq
    else:
        if gallery_labels is None:
            raise LangdmlError("a gallery needs gallery_labels")
        xg, yg = _validate(gallery, gallery_labels, "gallery")
        if xg.shape[1:] != xq.shape[1:]:
            raise LangdmlError(f"query and gallery embeddings differ in shape: {xq.shape[1:]} vs {xg.shape[1:]}")
    classes, inverse = np.unique(yq, return_inverse=True)
    if leave_one_out and len(classes) < 2:
        raise LangdmlError(f"retrieval needs at least 2 classes in the test split, got {len(classes)}")
    g_classes, g_counts = np.unique(yg, return_counts=True)
    r = _gallery_counts(yq, g_classes, g_counts) - (1 if leave_one_out else 0)
    scored = r > 0
    if not scored.any():
        raise LangdmlError(
            f"none of the {len(xq)} queries has an image of its class in the gallery: nothing to retrieve"
        )
    ks = check_ks(ks, len(xg) - (1 if leave_one_out else 0))

    xq = similarity.layout(xq)
    xg = xq if leave_one_out else similarity.layout(xg)
    n, n_gallery = len(xq), len(xg) - (1 if leave_one_out else 0)
    deepest = MAP_DEPTH if map_at_1000 else 0
    k_max = min(n_gallery, max(ks[-1], int(r.max()), deepest))
    chunk = min(n, chunk_size or max(1, NEIGHBOUR_BUDGET // (k_max + 1)))
    # Leave-one-out under the cosine at scale: the symmetric self-search (half the arithmetic) finds every row's
    # neighbours at once; otherwise each chunk of queries searches the gallery.
    symmetric = (
        leave_one_out and searcher is None and not similarity.sets and not map_at_1000 and n >= self_search_min_rows
    )
    if symmetric:
        table = self_search(xq, k_max + 1)[1]
    else:
        search = searcher(xg, k_max + 1) if searcher is not None else searcher_for(similarity, xg, k_max + 1)
    log.info("k-NN of %d queries in %d gallery items: %d neighbours, %d queries per chunk", n, len(xg), k_max, chunk)

    # Per-query values, summed once at the end: the result does not depend on the chunking.
    hits_all = np.zeros((n, len(ks)), dtype=bool)
    map_all = np.zeros(n)
    rp_all = np.zeros(n)
    map1000_all = np.zeros(n)
    starts = range(0, n, chunk)
    for start in tqdm(starts, desc="k-NN", unit="chunk", disable=len(starts) < 4 or None):
        stop = min(start + chunk, n)
        keep = scored[start:stop]
        if not keep.any():
            continue
        q_ids = np.arange(start, stop)[keep]
        k = min(n_gallery, max(ks[-1], int(r[q_ids].max()), deepest))
        depth = np.minimum(np.maximum(np.maximum(r[q_ids], ks[-1]), deepest), k)  # what this query's metrics read
        if symmetric:
            ids = drop_self(table[q_ids, : k + 1], q_ids)
        elif leave_one_out:
            ids = search_excluding_self(search, xq[q_ids], q_ids, k, depth)
        else:
            _, ids = search(np.ascontiguousarray(xq[q_ids], dtype=np.float32), k, depth)
        same = yg[ids] == yq[q_ids, None]
        hits_all[q_ids], map_all[q_ids], rp_all[q_ids] = _chunk_scores(same, r[q_ids], ks)
        if map_at_1000:
            top = same[:, :MAP_DEPTH]
            precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
            map1000_all[q_ids] = (precision * top).sum(axis=1) / (r[q_ids] + (1 if leave_one_out else 0))

    n_scored = int(scored.sum())
    hits_sum = hits_all.sum(axis=0)
    out: dict[str, float] = {f"recall@{k}": float(h) / n_scored for k, h in zip(ks, hits_sum, strict=True)}
    out["map@r"] = float(map_all.sum()) / n_scored
    out["r_precision"] = float(rp_all.sum()) / n_scored
    if map_at_1000:
        out["map@1000"] = float(map1000_all.sum()) / n_scored
    if nmi or f1:
        clusters = kmeans_assign(similarity.single_vectors(xq), len(classes), seed=seed, restarts=nmi_restarts)
        if nmi:
            out["nmi"] = normalized_mutual_info(inverse, clusters)
        if f1:
            out["f1"] = pairwise_f1(inverse, clusters)
    out["n_queries"] = n_scored
    out["n_classes"] = len(classes)
    out["n_skipped_queries"] = n - n_scored
    if n_scored < n:
        log.info("%d queries skipped: their class has no other gallery image", n - n_scored)
    return out


def check_ks(ks: Sequence[int], n_gallery: int) -> list[int]:
    """Sorted distinct ks; each must be in 1..n_gallery (recall@k beyond the gallery is 1 by definition)."""
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise LangdmlError(f"evaluate.ks must be positive integers, got {list(ks)}")
    if out[-1] > n_gallery:
        raise LangdmlError(
            f"evaluate.ks has {out[-1]}, but each query has only {n_gallery} other images to rank; "
            f"use ks up to {n_gallery}"
        )
    return out


def _gallery_counts(query_labels: np.ndarray, gallery_classes: np.ndarray, gallery_counts: np.ndarray) -> np.ndarray:
    """Number of gallery items with each query's label (0 where the gallery lacks the class)."""
    pos = np.minimum(np.searchsorted(gallery_classes, query_labels), len(gallery_classes) - 1)
    return np.where(gallery_classes[pos] == query_labels, gallery_counts[pos], 0).astype(np.int64)
