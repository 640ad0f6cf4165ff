"""NMI of a k-means clustering with one cluster per class (the DML protocol's clustering score)."""

from __future__ import annotations

import numpy as np

from stages.core.evaluation.search import faiss_gpu_count, load_faiss

KMEANS_ITERATIONS = 20
# k-means restarts for NMI (faiss ``nredo``): the run with the best objective is kept. One run lands far
# from the optimum on small or many-class sets; the cost grows linearly (minutes for SOP on a CPU).
KMEANS_RESTARTS = 5


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
    faiss = load_faiss()
    kmeans = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=KMEANS_ITERATIONS,
        nredo=restarts,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-len(x) // n_clusters)),
        gpu=faiss_gpu_count() > 0,
    )
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign[:, 0]
