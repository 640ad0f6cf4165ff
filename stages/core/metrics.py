"""Retrieval metrics of an embedding space: Recall@k, MAP@R, R-precision and NMI.

Definitions follow "A Metric Learning Reality Check" (Musgrave et al., 2020) and the shape of
pytorch-metric-learning's ``AccuracyCalculator.get_accuracy``: queries search a gallery, and with no
gallery every query searches all the other queries (itself excluded by index, so exact duplicates
still count as neighbours); R is the number of gallery images of the query's class. Neighbours
come from a searcher found by the similarity's name (an exact faiss inner-product index for
``cosine``) or passed in, searched in query chunks so a 60k x 512 test set never needs an N x N
matrix; each chunk is reduced to per-query numbers before the next one is searched.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stages.core.errors import LangdmlError
from stages.core.registry import Registry
from stages.core.vectors import l2_normalize

log = logging.getLogger(__name__)

# Neighbour entries (queries x neighbours) held at once; ~12 bytes each for faiss' ids and scores,
# plus the per-chunk label and precision arrays: about 100 MB at the default.
NEIGHBOUR_BUDGET = 2**21
# faiss-gpu cannot select more than this many neighbours per query; larger searches run on the CPU.
GPU_MAX_K = 2048
KMEANS_ITERATIONS = 20
# k-means restarts for NMI (faiss ``nredo``): the run with the best objective is kept. One run lands far
# from the optimum on small or many-class sets; the cost grows linearly (minutes for SOP on a CPU).
KMEANS_RESTARTS = 5

# search(queries, k, depth=None) -> (scores, ids), each len(queries) x k, best first. ``depth`` (one int
# per query, <= k) says how many leading results must be exact: a metric needs only max(R, largest k) of
# each query's ranking, which lets a certified search stop early. Exact searchers ignore it.
Searcher = Callable[..., tuple[np.ndarray, np.ndarray]]
# factory(database, largest k that will be asked) -> searcher over that database
SearcherFactory = Callable[[np.ndarray, int], Searcher]
SEARCHERS: Registry[SearcherFactory] = Registry("retrieval similarity", modules=("stages.core.set_search",))


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


def _faiss() -> Any:
    """faiss, imported quietly: its loader logs a ModuleNotFoundError at INFO when it falls back from AVX-512."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def format_metrics(metrics: dict[str, float]) -> str:
    """One log line: rates with 4 decimals, counts as integers."""
    return ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in metrics.items())


def _faiss_gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@SEARCHERS.register("cosine")
def flat_ip_searcher(database: np.ndarray, max_k: int) -> Searcher:
    """Exact inner-product search over ``database``; on a GPU when faiss-gpu sees one and ``max_k`` allows."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    if _faiss_gpu_count() > 0 and max_k <= GPU_MAX_K:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.resources = res  # the resources must outlive the GPU index

    def search(queries: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return index.search(queries, k)  # exact at every depth

    return search


def search_excluding_self(
    search: Searcher, queries: np.ndarray, query_ids: np.ndarray, k: int, depth: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of each query, without the query's own row.

    Searches ``k + 1`` (``depth + 1`` exact) and drops the entry whose id is the query's id; a query that
    is not among its own ``k + 1`` results (many exact duplicates ahead of it) drops its last entry
    instead. Needs ``k + 1 <= len(database)``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = search(queries, k + 1, None if depth is None else np.minimum(depth + 1, k + 1))
    keep = ids != query_ids[:, None]
    keep[:, -1] &= ~keep.all(axis=1)
    return scores[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)


def nearest_neighbours(
    embeddings: np.ndarray,
    query_ids: Sequence[int] | np.ndarray,
    k: int,
    similarity: str = "cosine",
    similarity_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Indices (len(query_ids) x k) of each query's k nearest other rows under ``similarity``."""
    x = l2_normalize(embeddings)
    k = min(k, len(x) - 1)
    qids = np.asarray(query_ids, dtype=np.int64)
    search = SEARCHERS.get(similarity)(x, k + 1, **(similarity_options or {}))
    _, ids = search_excluding_self(search, x[qids], qids, k)
    return ids


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


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI with the arithmetic mean of the two entropies as normaliser (scikit-learn's default).

    Built from the sparse contingency counts, so 11k classes x 11k clusters costs O(N), not O(C^2).
    """
    _, a = np.unique(np.asarray(labels), return_inverse=True)
    _, b = np.unique(np.asarray(clusters), return_inverse=True)
    n = len(a)
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    if na == nb == 1:
        return 1.0
    cells, joint = np.unique(a.astype(np.int64) * nb + b, return_counts=True)
    count_a = np.bincount(a, minlength=na).astype(np.float64)
    count_b = np.bincount(b, minlength=nb).astype(np.float64)
    joint = joint.astype(np.float64)
    outer = count_a[cells // nb] * count_b[cells % nb]
    mi = float(np.sum(joint / n * (np.log(joint) + np.log(n) - np.log(outer))))

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / n
        return float(-np.sum(p * np.log(p)))

    denom = (entropy(count_a) + entropy(count_b)) / 2
    return max(mi, 0.0) / max(denom, np.finfo(np.float64).eps)


def kmeans_assign(x: np.ndarray, n_clusters: int, seed: int = 0, restarts: int = KMEANS_RESTARTS) -> np.ndarray:
    """Seeded faiss k-means on all points (no subsampling, as in the paper's code): each row's cluster.

    ``restarts`` runs from different seeded initialisations, keeping the lowest objective (``nredo``).
    """
    faiss = _faiss()
    kmeans = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=KMEANS_ITERATIONS,
        nredo=restarts,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-len(x) // n_clusters)),
        gpu=_faiss_gpu_count() > 0,
    )
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign[:, 0]


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
    similarity: str = "cosine",
    similarity_options: dict[str, Any] | None = None,
    searcher: SearcherFactory | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    nmi: bool = True,
    nmi_restarts: int = KMEANS_RESTARTS,
) -> dict[str, float]:
    """Recall@k, MAP@R, R-precision and NMI of ``query`` embeddings (N x D) searching ``gallery``.

    ``gallery=None``: leave-one-out within the query set (the DML protocol). Queries whose class has
    no gallery image cannot be scored; they are counted in ``n_skipped_queries`` (``n_queries``
    counts the scored ones). ``similarity`` names the searcher (``cosine``: exact faiss inner
    product on L2-normalised rows; ``smooth_chamfer``: exact certified set search, options such as
    ``alpha`` in ``similarity_options``); ``searcher`` replaces it. N x K x D sets need a set
    similarity. NMI clusters the query embeddings into one cluster per query class (a set by the
    normalised mean of its slots). ``chunk_size`` (queries per search) defaults to what fits
    :data:`NEIGHBOUR_BUDGET`.
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
    make_searcher = searcher or SEARCHERS.get(similarity)
    if xq.ndim == 3 and searcher is None and similarity == "cosine":
        raise LangdmlError(
            f"embeddings are sets (N x K x D = {' x '.join(map(str, xq.shape))}); cosine compares single "
            "vectors: use similarity='smooth_chamfer' instead of flattening the set"
        )
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

    xq = l2_normalize(xq)
    xg = xq if leave_one_out else l2_normalize(xg)
    n, n_gallery = len(xq), len(xg) - (1 if leave_one_out else 0)
    k_max = min(n_gallery, max(ks[-1], int(r.max())))
    chunk = min(n, chunk_size or max(1, NEIGHBOUR_BUDGET // (k_max + 1)))
    search = make_searcher(xg, k_max + 1, **(similarity_options or {}))
    log.info("k-NN of %d queries in %d gallery items: %d neighbours, %d queries per chunk", n, len(xg), k_max, chunk)

    # Per-query values, summed once at the end: the result does not depend on the chunking.
    hits_all = np.zeros((n, len(ks)), dtype=bool)
    map_all = np.zeros(n)
    rp_all = np.zeros(n)
    starts = range(0, n, chunk)
    for start in tqdm(starts, desc="k-NN", unit="chunk", disable=len(starts) < 4 or None):
        stop = min(start + chunk, n)
        keep = scored[start:stop]
        if not keep.any():
            continue
        q_ids = np.arange(start, stop)[keep]
        k = min(n_gallery, max(ks[-1], int(r[q_ids].max())))
        depth = np.minimum(np.maximum(r[q_ids], ks[-1]), k)  # what this query's metrics read: R or the largest k
        if leave_one_out:
            _, ids = search_excluding_self(search, xq[q_ids], q_ids, k, depth)
        else:
            _, ids = search(np.ascontiguousarray(xq[q_ids], dtype=np.float32), k, depth)
        hits_all[q_ids], map_all[q_ids], rp_all[q_ids] = _chunk_scores(yg[ids] == yq[q_ids, None], r[q_ids], ks)

    n_scored = int(scored.sum())
    hits_sum = hits_all.sum(axis=0)
    out: dict[str, float] = {f"recall@{k}": float(h) / n_scored for k, h in zip(ks, hits_sum, strict=True)}
    out["map@r"] = float(map_all.sum()) / n_scored
    out["r_precision"] = float(rp_all.sum()) / n_scored
    if nmi:
        flat = xq if xq.ndim == 2 else l2_normalize(xq.mean(axis=1))
        out["nmi"] = normalized_mutual_info(
            inverse, kmeans_assign(flat, len(classes), seed=seed, restarts=nmi_restarts)
        )
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


def top_k(query: np.ndarray, gallery: np.ndarray, k: int, similarity: str, options: dict[str, Any]) -> np.ndarray:
    """Gallery ids (len(query) x k) of each query's k best, best first, by the searcher of ``similarity``.
    Vectors are L2-normalised (sets per slot); a set similarity takes N x D rows as sets of one."""
    if similarity != "cosine":
        query = query[:, None, :] if query.ndim == 2 else query
        gallery = gallery[:, None, :] if gallery.ndim == 2 else gallery
    elif query.ndim == 3 or gallery.ndim == 3:
        raise LangdmlError("sets (N x K x D) need a set similarity: similarity='smooth_chamfer'")
    q = np.ascontiguousarray(l2_normalize(query), dtype=np.float32)
    g = np.ascontiguousarray(l2_normalize(gallery), dtype=np.float32)
    search = SEARCHERS.get(similarity)(g, k, **options)
    return search(q, k)[1]


# Image x caption set pairs up to which cross-modal recall scores every pair (chunked, one pass for both
# directions) instead of running the certified search twice: at COCO-5K size (1.25e8 pairs, K = 4, 256-d)
# that is 27 s against 244 s on 2 CPU cores (benchmarks/crossmodal_eval.py).
CROSSMODAL_BRUTE_PAIRS = 2**28


def _set_top_k_both(
    images: np.ndarray,
    captions: np.ndarray,
    k_i2t: int,
    k_t2i: int,
    alpha: float,
    device: str = "cpu",
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact smooth-Chamfer top-k in both directions from one chunked pass over all pairs on ``device``: per
    image its ``k_i2t`` best captions, per caption its ``k_t2i`` best images (a running top-k merged chunk by
    chunk)."""
    import torch

    from stages.core.similarity import smooth_chamfer

    def on_device(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)

    caps = on_device(captions)
    best_s = torch.full((len(captions), 0), -torch.inf, device=device)
    best_i = torch.zeros((len(captions), 0), dtype=torch.long, device=device)
    i2t = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            scores = smooth_chamfer(on_device(images[start : start + chunk]), caps, alpha=alpha)  # chunk x captions
            i2t.append(scores.topk(k_i2t, dim=1).indices.cpu().numpy())
            top_s, top_i = scores.topk(min(k_t2i, scores.shape[0]), dim=0)
            merged_s = torch.cat([best_s, top_s.T], dim=1)
            merged_i = torch.cat([best_i, top_i.T + start], dim=1)
            keep = merged_s.topk(min(k_t2i, merged_s.shape[1]), dim=1).indices
            best_s, best_i = merged_s.gather(1, keep), merged_i.gather(1, keep)
    return np.concatenate(i2t), best_i.cpu().numpy()


def crossmodal_recall(
    images: np.ndarray,
    captions: np.ndarray,
    caption_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    similarity: str = "cosine",
    similarity_options: dict[str, Any] | None = None,
    brute_force_pairs: int = CROSSMODAL_BRUTE_PAIRS,
    device: str = "cpu",
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k in percent, and their sum ``rsum`` (the VSE / DivE protocol).

    ``images`` (N x D, or N x K x D sets) and ``captions`` (M x D or M x K x D); ``caption_to_image[j]``
    is the row of caption j's image. i2t: an image is a hit at k when any of its captions is among its k
    best captions; t2i: a caption is a hit when its image is among its k best images. Exact search by the
    searcher of ``similarity`` (``smooth_chamfer``: the certified set search, so thousands of images x
    tens of thousands of captions need no full score matrix); up to ``brute_force_pairs`` set pairs every
    pair is scored instead, in chunks on ``device`` (a torch device name), which is faster there (see
    :data:`CROSSMODAL_BRUTE_PAIRS`).
    """
    owner = np.asarray(caption_to_image, dtype=np.int64)
    n, m = len(images), len(captions)
    if owner.shape != (m,) or (m and (owner.min() < 0 or owner.max() >= n)):
        raise LangdmlError(f"caption_to_image must give one image row in 0..{n - 1} per caption ({m})")
    if np.bincount(owner, minlength=n).min(initial=1) == 0:
        raise LangdmlError("every image needs at least one caption for image-to-text recall")
    ks = sorted(set(ks))
    options = similarity_options or {}
    k_i2t, k_t2i = min(max(ks), m), min(max(ks), n)
    if similarity == "smooth_chamfer" and n * m <= brute_force_pairs:
        sets = [l2_normalize(x[:, None, :] if x.ndim == 2 else x) for x in (images, captions)]
        alpha = float(options.get("alpha", 16.0))
        best_caps, best_imgs = _set_top_k_both(*sets, k_i2t, k_t2i, alpha=alpha, device=device)
    else:
        best_caps = top_k(images, captions, k_i2t, similarity, options)
        best_imgs = top_k(captions, images, k_t2i, similarity, options)
    i2t = owner[best_caps] == np.arange(n)[:, None]
    t2i = best_imgs == owner[:, None]
    out: dict[str, float] = {}
    for name, hits in (("i2t", i2t), ("t2i", t2i)):
        first = np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])  # rank of the first hit
        for k in ks:
            out[f"{name}/recall@{k}"] = 100.0 * float(np.mean(first < k))
    out["rsum"] = sum(v for key, v in out.items() if "/recall@" in key)
    return out


def crossmodal_recall_folds(
    images: np.ndarray, captions: np.ndarray, caption_to_image: np.ndarray, folds: int, **kwargs: Any
) -> dict[str, float]:
    """The mean of :func:`crossmodal_recall` over ``folds`` consecutive blocks of images, each with its
    captions (the COCO 1K protocol: 5 folds of the 5,000 test images)."""
    owner = np.asarray(caption_to_image, dtype=np.int64)
    bounds = np.linspace(0, len(images), folds + 1).round().astype(int)
    runs = []
    for lo, hi in itertools.pairwise(bounds):
        mine = (owner >= lo) & (owner < hi)
        runs.append(crossmodal_recall(images[lo:hi], captions[mine], owner[mine] - lo, **kwargs))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
