"""Exact top-k retrieval of sets under smooth-Chamfer, without scoring every pair when it can.

Brute force costs K1 K2 times the single-vector search. Instead, for a chunk of query sets:
1. an exact faiss inner-product index over all N K2 gallery slots gives each query slot i its top-M slots;
   tau_i is the M-th score;
2. every gallery set owning a shortlisted slot of any query of the chunk is a candidate; the chunk is
   re-ranked against this union by the exact smooth-Chamfer (float64);
3. a set outside the union has all its slot similarities to query slot i at most tau_i, hence
   SC(X, Y) <= U(tau) (:func:`~stages.core.similarity.smooth_chamfer_upper_bound`); if a query's k-th exact
   score is at least U, no other set can enter its top-k: the result is certified exact.
   Otherwise M grows (x4) for the uncertified queries. Once the union would hold more than
   ``EXHAUSTIVE_FRACTION`` of the gallery, the chunk is scored against all of it (brute force), so the
   worst case costs about one brute-force pass plus the slot searches.
The bound is loose by up to (log K1 + log K2)/(2 alpha) (it assumes every slot of an unseen set reaches
tau), so certification is quick where classes are well separated and falls back to brute force where
all sets are nearly equally similar. Ties are broken by the lower gallery index, as a stable sort of
the brute-force scores would. ``stats`` counts the queries certified at the first M and by brute force.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.core.metrics import SEARCHERS, Searcher, flat_ip_searcher
from stages.core.similarity import smooth_chamfer, smooth_chamfer_upper_bound

GROWTH = 4
QUERY_CHUNK = 16  # queries certified together: small, so that their candidate union stays small
EXHAUSTIVE_FRACTION = 0.25
# faiss scores are float32: the bound is raised by this much so that rounding can never cut off a set.
BOUND_SLACK = 1e-5


class SmoothChamferSearch:
    """``search(queries Q x K1 x D, k) -> (scores Q x k, gallery ids Q x k)``, exact, best first."""

    def __init__(self, database: np.ndarray, alpha: float = 16.0, centered: bool = False, shortlist: int = 32) -> None:
        db = np.ascontiguousarray(database, dtype=np.float32)
        if db.ndim != 3:
            raise ValueError(f"the gallery must be N x K x D sets, got shape {db.shape}")
        self.n, self.k2, self.dim = db.shape
        self.sets = torch.tensor(db, dtype=torch.float64)
        self.slots = db.reshape(-1, self.dim)
        self.owner = np.repeat(np.arange(self.n), self.k2)
        self.alpha, self.centered, self.shortlist = alpha, centered, shortlist
        self._index: dict[bool, Searcher] = {}
        self.stats = {"queries": 0, "certified_first": 0, "brute_force": 0}

    def _slot_search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        small = m <= 2048  # faiss-gpu's largest k; beyond it the CPU index answers
        if small not in self._index:
            self._index[small] = flat_ip_searcher(self.slots, m if small else 2049)
        return self._index[small](queries, m)

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[2] != self.dim:
            raise ValueError(f"queries must be Q x K x {self.dim} sets, got shape {q.shape}")
        k = min(k, self.n)
        scores = np.empty((len(q), k), dtype=np.float64)
        ids = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), QUERY_CHUNK):
            self._search_chunk(q, np.arange(start, min(start + QUERY_CHUNK, len(q))), k, scores, ids)
        self.stats["queries"] += len(q)
        return scores, ids

    def _exact(self, queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query among ``gallery`` (sorted ids) by float64 smooth-Chamfer; ties: lower id first."""
        exact = smooth_chamfer(
            torch.tensor(queries, dtype=torch.float64), self.sets[gallery], alpha=self.alpha, centered=self.centered
        ).numpy()
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, axis=1), gallery[order]

    def _search_chunk(self, q: np.ndarray, pending: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray) -> None:
        total, k1 = self.n * self.k2, q.shape[1]
        m = min(total, max(self.shortlist, 2 * k))
        first = True
        while len(pending):
            s, idx = self._slot_search(q[pending].reshape(-1, self.dim), m)
            union = np.unique(self.owner[idx])
            if m >= total or len(union) > EXHAUSTIVE_FRACTION * self.n:
                scores[pending], ids[pending] = self._exact(q[pending], np.arange(self.n), k)
                self.stats["brute_force"] += len(pending)
                return
            tau = torch.from_numpy(s.reshape(len(pending), k1, m)[:, :, -1].astype(np.float64))
            bound = smooth_chamfer_upper_bound(tau, self.k2, alpha=self.alpha, centered=self.centered).numpy()
            if len(union) >= k:
                top, top_ids = self._exact(q[pending], union, k)
                ok = top[:, -1] >= bound + BOUND_SLACK
                scores[pending[ok]], ids[pending[ok]] = top[ok], top_ids[ok]
                self.stats["certified_first"] += int(first) * int(ok.sum())
                pending = pending[~ok]
            m = min(total, m * GROWTH)
            first = False


@SEARCHERS.register("smooth_chamfer")
def smooth_chamfer_searcher(
    database: np.ndarray, max_k: int, *, alpha: float = 16.0, centered: bool = False, shortlist: int = 32
) -> SmoothChamferSearch:
    return SmoothChamferSearch(database, alpha=alpha, centered=centered, shortlist=shortlist)
