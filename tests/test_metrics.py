"""Retrieval metrics against hand-computed toy sets, a brute-force numpy reference and scikit-learn."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from guards import run
from sklearn.metrics import normalized_mutual_info_score

from stages.core.errors import LangdmlError
from stages.core.evaluation.metrics import class_centroids, cosine_similarity_matrix, retrieval_metrics
from stages.core.evaluation.nmi import kmeans_assign, normalized_mutual_info
from stages.core.evaluation.search import nearest_neighbours

ROOT = Path(__file__).resolve().parents[1]


def _on_circle(degrees: list[float]) -> np.ndarray:
    """Unit vectors at these angles: cosine similarity orders neighbours by angular distance."""
    t = np.deg2rad(np.asarray(degrees))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


# Angles and labels of the toy set; neighbour orders (no ties) worked out by hand:
#   A(0):   B+ C- D- E+ F-     B(10): A+ C- D- E+ F-     C(25):  B- D+ A- E- F+
#   D(45):  C+ E- B- A- F+     E(70): D- F- C- B+ A+     F(100): E- D+ C+ B- A-
# R = 2 for everyone, so MAP@R per query = (1/2) * sum over correct hits in the top 2 of precision@i:
#   A 1/2, B 1/2, C 1/4, D 1/2, E 0, F 1/4 -> mean 1/3;  R-precision: 1/2 except E (0) -> 5/12.
TOY_ANGLES = [0, 10, 25, 45, 70, 100]
TOY_LABELS = [0, 0, 1, 1, 0, 1]


def test_toy_set_by_hand() -> None:
    m = retrieval_metrics(_on_circle(TOY_ANGLES), query_labels=np.array(TOY_LABELS), ks=(1, 2, 4))
    assert m["recall@1"] == pytest.approx(3 / 6)  # A, B, D
    assert m["recall@2"] == pytest.approx(5 / 6)  # all but E
    assert m["recall@4"] == pytest.approx(1.0)  # E finds B at rank 4
    assert m["map@r"] == pytest.approx(1 / 3)
    assert m["r_precision"] == pytest.approx(5 / 12)
    assert (m["n_queries"], m["n_classes"], m["n_skipped_queries"]) == (6, 2, 0)


def test_map_at_r_averages_precision_over_r() -> None:
    # Query 0 (class 0, R = 3) sees + (10deg), - (22deg), + (31deg), + (43deg), so within R = 3:
    # AP@R = (1/1 + 0 + 2/3) / 3 = 5/9 and R-precision = 2/3. No two distances tie for any query.
    x = _on_circle([0, 10, 22, 31, 43, 180, 190])
    y = np.array([0, 0, 1, 0, 0, 1, 1])
    reference = _brute_force_per_query(x, y)
    assert reference["map@r"][0] == pytest.approx(5 / 9)
    assert reference["r_precision"][0] == pytest.approx(2 / 3)
    m = retrieval_metrics(x, query_labels=y, ks=(1,))
    assert m["map@r"] == pytest.approx(reference["map@r"].mean())
    assert m["r_precision"] == pytest.approx(reference["r_precision"].mean())


def test_singleton_class_is_a_distractor_not_a_query() -> None:
    # G (200deg, its own class) is farther from everyone than the neighbours that decide the metrics.
    x = _on_circle([*TOY_ANGLES, 200])
    y = np.array([*TOY_LABELS, 7])
    m = retrieval_metrics(x, query_labels=y, ks=(1, 2, 4))
    assert (m["n_queries"], m["n_classes"], m["n_skipped_queries"]) == (6, 3, 1)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["map@r"] == pytest.approx(1 / 3)


def test_singleton_changes_recall_when_it_is_near() -> None:
    # A singleton at 5deg sits between A and B: A's and B's first neighbour becomes wrong.
    x = _on_circle([*TOY_ANGLES, 5])
    y = np.array([*TOY_LABELS, 7])
    m = retrieval_metrics(x, query_labels=y, ks=(1,))
    assert m["recall@1"] == pytest.approx(1 / 6)  # only D
    assert m["n_skipped_queries"] == 1


def test_self_is_excluded_by_index_even_among_duplicates() -> None:
    # Three identical images of class 0: each must find another copy, never itself.
    x = _on_circle([0, 0, 0, 90, 95])
    y = np.array([0, 0, 0, 1, 1])
    m = retrieval_metrics(x, query_labels=y, ks=(1, 2))
    assert m["recall@1"] == 1.0
    assert m["map@r"] == 1.0
    ids = nearest_neighbours(x, [0, 1, 2], k=2)
    for q, row in zip([0, 1, 2], ids, strict=True):
        assert q not in row
        assert set(row) == {0, 1, 2} - {q}


def test_k_larger_than_the_gallery_is_an_error_not_a_recall_of_one() -> None:
    with pytest.raises(LangdmlError, match=r"evaluate\.ks has 100, but each query has only 5 other images"):
        retrieval_metrics(_on_circle(TOY_ANGLES), query_labels=np.array(TOY_LABELS), ks=(1, 100))


def _brute_force_per_query(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """The definitions, one query at a time, from a full similarity matrix."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    out: dict[str, list[float]] = {"map@r": [], "r_precision": [], **{f"recall@{k}": [] for k in ks}}
    for q in range(len(x)):
        others = np.array([j for j in range(len(x)) if j != q])
        order = others[np.argsort(-sim[q, others], kind="stable")]
        rel = y[order] == y[q]
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(float(rel[:k].any()))
        hits, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                ap += hits / (i + 1)
        out["map@r"].append(ap / r)
        out["r_precision"].append(rel[:r].sum() / r)
    return {k: np.asarray(v) for k, v in out.items()}


def _clustered(n: int, n_classes: int, dim: int, seed: int, noise: float = 1.2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    y = rng.integers(0, n_classes, n)
    y[0] = n_classes + 5  # a singleton class
    x = np.where(y[:, None] < n_classes, centres[np.minimum(y, n_classes - 1)], 0.0)
    x = x + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_matches_brute_force_on_clustered_data() -> None:
    x, y = _clustered(300, 12, 16, seed=1)
    ks = (1, 2, 4, 8, 16)
    m = retrieval_metrics(x, query_labels=y, ks=ks)
    ref = _brute_force_per_query(x, y, ks)
    for key, values in ref.items():
        assert m[key] == pytest.approx(values.mean(), abs=1e-12), key
    assert m["n_queries"] == len(ref["map@r"]) == 299
    assert (m["n_classes"], m["n_skipped_queries"]) == (13, 1)
    assert 0.0 < m["nmi"] <= 1.0


def test_chunked_search_equals_unchunked() -> None:
    x, y = _clustered(257, 9, 8, seed=2)
    whole = retrieval_metrics(x, query_labels=y, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert retrieval_metrics(x, query_labels=y, chunk_size=chunk) == whole


def test_embeddings_are_normalised_inside() -> None:
    x, y = _clustered(120, 5, 8, seed=3)
    assert retrieval_metrics(3.0 * x, query_labels=y, nmi=False) == retrieval_metrics(x, query_labels=y, nmi=False)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2]),
        ([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]),
        ([0, 0, 0, 1, 1, 1, 2, 2, 9], [5, 5, 6, 6, 6, 7, 7, 7, 7]),
        ([3, 3, 3, 3], [0, 1, 2, 3]),
        ([1, 1, 1], [4, 4, 4]),
    ],
)
def test_nmi_matches_sklearn(a: list[int], b: list[int]) -> None:
    assert normalized_mutual_info(np.array(a), np.array(b)) == pytest.approx(
        normalized_mutual_info_score(a, b), abs=1e-12
    )


def test_nmi_matches_sklearn_on_random_assignments() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 30, 2000), rng.integers(0, 25, 2000)
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_kmeans_recovers_separated_clusters_and_is_seeded() -> None:
    x, y = _clustered(200, 4, 16, seed=5, noise=0.05)
    x, y = x[1:], y[1:]  # drop the singleton
    assign = kmeans_assign(x, 4, seed=0)
    assert normalized_mutual_info(y, assign) == pytest.approx(1.0)
    np.testing.assert_array_equal(assign, kmeans_assign(x, 4, seed=0))
    assert retrieval_metrics(x, query_labels=y)["nmi"] == pytest.approx(1.0)


def test_centroids_and_cosine_similarity() -> None:
    emb = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    c = class_centroids(emb, np.array([5, 5, 2]), [5, 2])
    np.testing.assert_allclose(c, [[2.0, 0.0], [0.0, 2.0]])
    c45 = 0.5**0.5
    sim = cosine_similarity_matrix(np.array([[2.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(sim, [[1, c45], [c45, 1]])
    with pytest.raises(ValueError, match="no embedding"):
        class_centroids(emb, np.array([5, 5, 2]), [5, 3])


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.array([[np.nan, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0, 0, 1]), "NaN or inf"),
        (np.array([[np.inf, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.array([0, 0, 1]), "NaN or inf"),
        (np.ones((3, 2)), np.array([0, 1]), "one per embedding"),
        (np.ones(3), np.array([0, 1, 1]), "N x D"),
        (np.eye(3), np.array([4, 4, 4]), "at least 2 classes"),
        (np.eye(3), np.array([0, 1, 2]), "nothing to retrieve"),
    ],
)
def test_invalid_input_is_one_line(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(LangdmlError, match=match) as err:
        retrieval_metrics(x, query_labels=y)
    assert "\n" not in str(err.value)


def test_bad_ks() -> None:
    with pytest.raises(LangdmlError, match="ks"):
        retrieval_metrics(_on_circle(TOY_ANGLES), query_labels=np.array(TOY_LABELS), ks=(0, 1))


def _brute_force_gallery(q: np.ndarray, yq: np.ndarray, g: np.ndarray, yg: np.ndarray, ks: tuple[int, ...]) -> dict:
    """Query/gallery definitions one query at a time; queries with no gallery image of their class skipped."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ g.T.astype(np.float64)
    out: dict[str, list[float]] = {"map@r": [], "r_precision": [], **{f"recall@{k}": [] for k in ks}}
    for i in range(len(q)):
        rel = yg[np.argsort(-sim[i], kind="stable")] == yq[i]
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(float(rel[:k].any()))
        precision = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        out["map@r"].append(float((precision * rel[:r]).sum() / r))
        out["r_precision"].append(rel[:r].sum() / r)
    return {k: np.asarray(v) for k, v in out.items()}


def test_query_gallery_matches_brute_force() -> None:
    x, y = _clustered(400, 10, 16, seed=7)
    q, yq, g, yg = x[:120], y[:120], x[120:], y[120:]
    yq = yq.copy()
    yq[:3] = 99  # a class the gallery lacks: skipped, counted
    ks = (1, 2, 4, 8)
    m = retrieval_metrics(q, g, query_labels=yq, gallery_labels=yg, ks=ks, nmi=False)
    ref = _brute_force_gallery(q, yq, g, yg, ks)
    for key, values in ref.items():
        assert m[key] == pytest.approx(values.mean(), abs=1e-12), key
    assert m["n_queries"] == len(ref["map@r"]) and m["n_skipped_queries"] == 120 - m["n_queries"] >= 3


def test_query_gallery_matches_pytorch_metric_learning() -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = _clustered(300, 8, 16, seed=8)
    x, y = x[1:], y[1:]  # PML counts a singleton class differently: drop it
    q, yq, g, yg = x[:100], y[:100], x[100:], y[100:]
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k="max_bin_count"
    )
    pml = calc.get_accuracy(q, yq, g, yg, ref_includes_query=False)
    m = retrieval_metrics(q, g, query_labels=yq, gallery_labels=yg, ks=(1,), nmi=False)
    assert m["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert m["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert m["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


def test_gallery_arguments_must_come_together() -> None:
    x, y = _clustered(50, 4, 8, seed=9)
    with pytest.raises(LangdmlError, match="gallery_labels"):
        retrieval_metrics(x, x, query_labels=y)
    with pytest.raises(LangdmlError, match="without a gallery"):
        retrieval_metrics(x, query_labels=y, gallery_labels=y)
    with pytest.raises(LangdmlError, match="differ in shape"):
        retrieval_metrics(x, x[:, :4], query_labels=y, gallery_labels=y)


def test_set_embeddings_are_not_flattened_into_cosine() -> None:
    sets = np.random.default_rng(0).standard_normal((20, 4, 8)).astype(np.float32)
    with pytest.raises(LangdmlError, match=r"sets .*20 x 4 x 8.*smooth_chamfer") as err:
        retrieval_metrics(sets, query_labels=np.repeat(np.arange(5), 4))
    assert "\n" not in str(err.value)


def test_a_searcher_can_be_passed_in() -> None:
    x, y = _clustered(100, 5, 8, seed=10)
    calls: list[tuple[int, int]] = []

    def brute(database: np.ndarray, max_k: int):
        def search(queries: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
            calls.append((len(queries), k))
            sim = queries @ database.T
            ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sim, ids, axis=1), ids

        return search

    assert retrieval_metrics(x, query_labels=y, searcher=brute, nmi=False) == retrieval_metrics(
        x, query_labels=y, nmi=False
    )
    assert calls


def _ten_blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), 30)
    x = rng.standard_normal((10, 16))[y] + 0.6 * rng.standard_normal((300, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_nmi_restarts_reach_sklearns_optimum() -> None:
    """300 points in 10 classes: one k-means run lands far from the optimum (0.89 on seed 0), so NMI
    keeps the best of several seeded runs; it then equals scikit-learn's 5-restart k-means."""
    from sklearn.cluster import KMeans

    for seed in (0, 2, 3):
        x, y = _ten_blobs(seed)
        sk = normalized_mutual_info(y, KMeans(10, n_init=5, random_state=0).fit_predict(x))
        ours = retrieval_metrics(x, query_labels=y, ks=(1,))["nmi"]
        assert ours >= sk - 0.01, (seed, ours, sk)
    x, y = _ten_blobs(0)
    single = normalized_mutual_info(y, kmeans_assign(x, 10, seed=0, restarts=1))
    best = normalized_mutual_info(y, kmeans_assign(x, 10, seed=0))
    assert single < best - 0.05  # what the restarts fix


def _integer_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Small integers: every inner product is an exact integer in float32 (any summation order), so exact
    ties abound and any correct search must return exactly the reference order."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    x[n // 3] = x[n // 5]  # exact duplicates
    x[n // 2] = x[n // 5]
    return x


def _reference_scores(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force in integers: each row's k best scores, best first."""
    g = x.astype(np.int64) @ x.astype(np.int64).T
    return -np.sort(-g, axis=1)[:, :k]


@pytest.mark.parametrize(("n", "block"), [(700, 128), (700, 700), (1000, 256)])
def test_symmetric_self_search_is_exact_and_equals_the_flat_index_with_ties(n: int, block: int) -> None:
    from stages.core.evaluation.search import flat_ip_searcher, self_search

    x = _integer_vectors(n, 6, seed=n)
    scores, ids = self_search(x, 9, block=block)
    np.testing.assert_array_equal(scores, _reference_scores(x, 9))  # the exact top-k
    g = x.astype(np.int64) @ x.astype(np.int64).T
    np.testing.assert_array_equal(np.take_along_axis(g, ids, axis=1), scores)  # ids that score them
    flat_scores, flat_ids = flat_ip_searcher(x, 9)(x, 9)  # today's search: the same ids in the same tie order
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_array_equal(scores, flat_scores)


def test_self_search_heaps_deeper_than_a_block_and_any_thread_count() -> None:
    """k above the block size (a heap row filled over several blocks, ragged last block) equals the flat
    index; the numba kernels give the same heaps on one thread as on every core (threads own disjoint rows).
    k = 99: from k = 100 (``distance_compute_min_k_reservoir``) faiss keeps a reservoir, not heaps, and
    breaks exact ties at the boundary its own way."""
    import numba
    import torch

    from stages.core.evaluation.search import flat_ip_searcher, self_search

    x = _integer_vectors(333, 5, seed=7)
    flat_scores, flat_ids = flat_ip_searcher(x, 99)(x, 99)
    scores, ids = self_search(x, 99, block=64)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_array_equal(scores, flat_scores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_scores, one_ids = self_search(x, 99, block=64)
        assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)  # restored
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one_ids, ids)
    np.testing.assert_array_equal(one_scores, scores)


def test_leave_one_out_metrics_equal_the_chunked_flat_search() -> None:
    """The symmetric path gives exactly the metrics of the per-chunk flat search it replaces."""
    from stages.core.evaluation.search import flat_ip_searcher

    rng = np.random.default_rng(3)
    # Four entries of +-1 in 8: norm 2, so the unit vectors are exact (+-0.5) and so is every inner product
    # (a multiple of 1/4): the same values in any summation order, with exact ties everywhere.
    x = np.zeros((900, 8), dtype=np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    x[::7] = x[1]  # many duplicate vectors, some of other classes
    y = rng.integers(0, 30, 900)
    fast = retrieval_metrics(x, query_labels=y, ks=(1, 2, 4, 8), nmi=False, self_search_min_rows=0)
    flat = retrieval_metrics(x, query_labels=y, ks=(1, 2, 4, 8), nmi=False, searcher=flat_ip_searcher)
    below = retrieval_metrics(x, query_labels=y, ks=(1, 2, 4, 8), nmi=False, self_search_min_rows=901)
    assert fast == flat == below


def test_small_evaluations_take_the_flat_index_and_never_import_numba() -> None:
    """Below SELF_SEARCH_MIN_ROWS a fresh process pays nothing for the self-search's kernels; from it, it does."""
    code = (
        "import sys, numpy as np\n"
        "from stages.core.evaluation.metrics import retrieval_metrics\n"
        "x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "retrieval_metrics(x, query_labels=np.arange(300) % 10, nmi=False, self_search_min_rows={rows})\n"
        "print('numba' in sys.modules)"
    )
    below, above = (run([sys.executable, "-c", code.format(rows=r)], cwd=ROOT).stdout.strip() for r in (301, 300))
    assert (below, above) == ("False", "True")


def _overlapping(n: int, dim: int, classes: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    y = np.arange(n) % classes
    x = centres[y] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.mark.parametrize(
    ("n", "dim", "classes", "noise"), [(1000, 16, 50, 1.0), (2000, 32, 200, 1.2), (1500, 64, 300, 1.5)]
)
def test_nmi_of_kmeans_plus_plus_matches_scikit_learn_on_overlapping_clusters(n, dim, classes, noise) -> None:
    """Hard cases (overlapping clusters, few points per cluster): one k-means++ run per seed, mean NMI over 10
    seeds within 0.01 of scikit-learn's KMeans (greedy k-means++, Lloyd to convergence); the seeding, not the
    metric, was what made faiss' random starts land lower."""
    from sklearn.cluster import KMeans

    x, y = _overlapping(n, dim, classes, noise)
    ours = np.mean([normalized_mutual_info(y, kmeans_assign(x, classes, seed=s, restarts=1)) for s in range(10)])
    theirs = np.mean(
        [normalized_mutual_info_score(y, KMeans(classes, n_init=1, random_state=s).fit_predict(x)) for s in range(10)]
    )
    assert abs(ours - theirs) <= 0.01, (ours, theirs)


def test_kmeans_plus_plus_seeds_are_seeded_distinct_points_and_batches_keep_their_quality() -> None:
    from stages.core.evaluation.nmi import kmeans_plus_plus

    x, _ = _overlapping(1200, 16, 240, 1.2)
    a, b = kmeans_plus_plus(x, 240, seed=4), kmeans_plus_plus(x, 240, seed=4)
    np.testing.assert_array_equal(a, b)
    assert len({row.tobytes() for row in a}) == 240  # distinct data points
    assert set(map(bytes, a.view(np.uint8))) <= set(map(bytes, x.view(np.uint8)))

    def potential(c: np.ndarray) -> float:
        return float((((x[:, None, :] - c[None]) ** 2).sum(-1)).min(1).sum())

    one_by_one = potential(kmeans_plus_plus(x, 240, seed=4, per_round=1))
    assert potential(a) <= 1.05 * one_by_one  # 3 per round (240 / 64) lose almost nothing


def test_pairwise_f1_equals_counting_every_pair() -> None:
    from itertools import combinations

    from stages.core.evaluation.nmi import pairwise_f1

    rng = np.random.default_rng(4)
    labels, clusters = rng.integers(0, 5, 60), rng.integers(0, 7, 60)
    tp = same_class = same_cluster = 0
    for i, j in combinations(range(60), 2):
        tp += labels[i] == labels[j] and clusters[i] == clusters[j]
        same_class += labels[i] == labels[j]
        same_cluster += clusters[i] == clusters[j]
    p, r = tp / same_class, tp / same_cluster
    assert pairwise_f1(labels, clusters) == pytest.approx(2 * p * r / (p + r))
    assert pairwise_f1(labels, labels) == pytest.approx(1.0)


def test_map_at_1000_and_f1_follow_the_official_definitions() -> None:
    """mAP@1000 as metrics/mAP_1000.py: precision at every hit among the 1,000 nearest others, summed and
    divided by the class's size with the query counted; F1 of the same clustering NMI uses."""
    from stages.core.evaluation.nmi import kmeans_assign, pairwise_f1

    x, y = _clustered(1300, 40, 16, seed=11, noise=1.5)
    m = retrieval_metrics(x, query_labels=y, ks=(1,), nmi=False, f1=True, map_at_1000=True)
    g = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(g, -np.inf)
    order = np.argsort(-g, axis=1, kind="stable")[:, :1000]
    same = y[order] == y[:, None]
    precision = np.cumsum(same, axis=1) / np.arange(1, 1001)
    counts = np.bincount(y)[y]
    scored = counts > 1  # a query alone in its class is skipped, as for every other metric (n_skipped_queries)
    want = float(np.mean(((precision * same).sum(axis=1) / counts)[scored]))
    assert m["map@1000"] == pytest.approx(want, abs=1e-6)
    from stages.core.vectors import l2_normalize

    assert m["f1"] == pytest.approx(pairwise_f1(y, kmeans_assign(l2_normalize(x), 41, seed=0)))


def test_the_heap_kernel_is_compiled_into_numbas_cache_at_install() -> None:
    """`make venv` calls compile_kernels, so a fresh clone's first evaluation finds the kernel on disk."""
    from stages.core.evaluation import heaps

    heaps.compile_kernels()
    assert heaps.feed_block.signatures
    cache = Path(heaps.__file__).parent / "__pycache__"
    assert any(cache.glob("heaps.feed_block-*.nbi")) and any(cache.glob("heaps.feed_block-*.nbc"))
