"""NMI of a k-means clustering with one cluster per class (the DML protocol's clustering score)."""

from __future__ import annotations

import logging

import numpy as np

from stages.core.evaluation.faiss_lib import faiss_gpu_count, load_faiss

log = logging.getLogger(__name__)

KMEANS_ITERATIONS = 20
# k-means runs for NMI (``evaluate.nmi_restarts``), each from its own k-means++ seeds; the lowest objective
# is kept. Few clusters need them (one run lands on a poor local optimum one time in three); with
# thousands of clusters one k-means++ run varies little, so the runs are capped to what fits this many
# floating-point operations (SOP's 11,318 clusters: one run, ~20 TFLOP).
KMEANS_RESTARTS = 5
KMEANS_FLOP_BUDGET = 4e12


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


def pairwise_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The clustering F1 of the DML protocol (ExplainableML/LanguageGuidance_for_DML ``metrics/f1.py``): pairs
    of samples counted as same-class (truth) and same-cluster (prediction); P = TP / same-class pairs, R = TP /
    same-cluster pairs, F1 = 2PR / (P + R). (The official code relabels each cluster by its medoid, which does
    not change the partition.) From the sparse contingency counts, so 11k x 11k costs O(N)."""
    _, a = np.unique(np.asarray(labels), return_inverse=True)
    _, b = np.unique(np.asarray(clusters), return_inverse=True)
    nb = int(b.max()) + 1

    def pairs(counts: np.ndarray) -> float:
        c = counts.astype(np.float64)
        return float((c * (c - 1) / 2).sum())

    tp = pairs(np.unique(a.astype(np.int64) * nb + b, return_counts=True)[1])
    same_class, same_cluster = pairs(np.bincount(a)), pairs(np.bincount(b))
    if tp == 0:
        return 0.0
    precision, recall = tp / same_class, tp / same_cluster
    return 2 * precision * recall / (precision + recall)


def kmeans_plus_plus(
    x: np.ndarray, n_clusters: int, seed: int = 0, per_round: int | None = None, trials: int | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007; scikit-learn's greedy variant): each new centre
    is the best, by the potential it leaves, of ``trials`` (2 + ln k) candidates drawn with probability
    proportional to the squared distance to the nearest centre so far. ``per_round`` centres (k / 64 by
    default) draw their candidates together, so one N x (per_round x trials) product serves them all (SOP's
    11,318 centres: 64 rounds instead of 11,318 passes over the data); within a round they are still chosen
    one after the other, each seeing the ones before it. Returns k x D centres."""
    import torch

    rng = np.random.default_rng(seed)
    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = (points * points).sum(dim=1)
    n = len(points)
    per_round = per_round or max(1, n_clusters // 64)
    trials = trials or 2 + int(np.log(n_clusters))

    def sq_distances(rows: np.ndarray) -> torch.Tensor:
        """N x len(rows) squared distances to the points ``rows``."""
        index = torch.from_numpy(rows)
        return (norms[:, None] + norms[index][None, :] - 2 * points @ points[index].T).clamp_min(0)

    chosen = [int(rng.integers(n))]
    closest = sq_distances(np.array(chosen))[:, 0]
    while len(chosen) < n_clusters:
        m = min(per_round, n_clusters - len(chosen))
        weights = closest.double().numpy()
        total = weights.sum()
        p = weights / total if total > 0 else None  # every point is a centre already: draw uniformly
        candidates = rng.choice(n, size=(m, trials), p=p)
        d = sq_distances(candidates.ravel()).view(n, m, trials)
        for slot in range(m):
            potentials = torch.minimum(closest[:, None], d[:, slot]).double().sum(dim=0)
            best = int(potentials.argmin())
            chosen.append(int(candidates[slot, best]))
            closest = torch.minimum(closest, d[:, slot, best])
    return points[torch.tensor(chosen)].numpy()


def kmeans_assign(x: np.ndarray, n_clusters: int, seed: int = 0, restarts: int = KMEANS_RESTARTS) -> np.ndarray:
    """faiss k-means on all points (no subsampling, as in the paper's code) from k-means++ seeds: each row's
    cluster. ``restarts`` runs from different seeded initialisations, keeping the lowest objective, as many
    of them as fit :data:`KMEANS_FLOP_BUDGET`."""
    faiss = load_faiss()
    trials = 2 + int(np.log(n_clusters))
    per_run = 2.0 * len(x) * n_clusters * x.shape[1] * (KMEANS_ITERATIONS + trials)
    runs = max(1, min(restarts, int(KMEANS_FLOP_BUDGET // per_run)))
    if runs < restarts:
        log.info("NMI: %d k-means run(s) instead of %d (%.1f TFLOP each)", runs, restarts, per_run / 1e12)
    best, best_obj = None, np.inf
    for run in range(runs):
        kmeans = faiss.Kmeans(
            x.shape[1],
            n_clusters,
            niter=KMEANS_ITERATIONS,
            seed=seed + run,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=max(1, -(-len(x) // n_clusters)),
            gpu=faiss_gpu_count() > 0,
        )
        kmeans.train(x, init_centroids=kmeans_plus_plus(x, n_clusters, seed=seed + run))
        if kmeans.obj[-1] < best_obj:
            best, best_obj = kmeans, kmeans.obj[-1]
    _, assign = best.index.search(x, 1)
    return assign[:, 0]
