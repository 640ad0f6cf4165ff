"""Exact top-k retrieval of sets under smooth-Chamfer, without scoring every pair.

Brute force costs K1 K2 times the single-vector search. Instead, for each query set X (K1 slots):
1. an exact faiss inner-product index over all N K2 gallery slots gives each query slot i its top-M slots;
   tau_i is the M-th score;
2. every gallery set owning a shortlisted slot is a candidate and is re-ranked by the exact smooth-Chamfer;
3. a set with no shortlisted slot has all its slot similarities to slot i at most tau_i, hence
   SC(X, Y) <= U(tau) (:func:`~stages.core.similarity.smooth_chamfer_upper_bound`); if the k-th exact
   candidate score is at least U, no other set can enter the top-k: the result is certified exact.
   Otherwise M grows (x4) for the uncertified queries, up to all N K2 slots (brute force).
Scores are float64 smooth-Chamfer of the float32 embeddings; ties are broken by the lower gallery index,
as a stable sort of the brute-force scores would. ``stats`` counts queries certified at the first M.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.core.metrics import SEARCHERS, Searcher, flat_ip_searcher
from stages.core.similarity import smooth_chamfer, smooth_chamfer_upper_bound

GROWTH = 4
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
        n_q, k1 = q.shape[:2]
        scores = np.empty((n_q, k), dtype=np.float64)
        ids = np.empty((n_q, k), dtype=np.int64)
        total = self.n * self.k2
        m = min(total, max(self.shortlist, 2 * k))
        pending = np.arange(n_q)
        first = True
        while len(pending):
            s, idx = self._slot_search(q[pending].reshape(-1, self.dim), m)
            s, idx = s.reshape(len(pending), k1, m), idx.reshape(len(pending), k1, m)
            exhaustive = m >= total
            bound = smooth_chamfer_upper_bound(
                torch.from_numpy(s[:, :, -1].astype(np.float64)), self.k2, alpha=self.alpha, centered=self.centered
            ).numpy()
            left = []
            for row, qi in enumerate(pending):
                cand = np.arange(self.n) if exhaustive else np.unique(self.owner[idx[row].ravel()])
                if len(cand) < k:
                    left.append(qi)
                    continue
                exact = smooth_chamfer(
                    torch.tensor(q[qi : qi + 1], dtype=torch.float64),
                    self.sets[cand],
                    alpha=self.alpha,
                    centered=self.centered,
                )[0].numpy()
                order = np.lexsort((cand, -exact))[:k]  # best first, ties by the lower gallery index
                if exhaustive or exact[order[-1]] >= bound[row] + BOUND_SLACK:
                    scores[qi], ids[qi] = exact[order], cand[order]
                    self.stats["certified_first"] += int(first)
                    self.stats["brute_force"] += int(exhaustive and not first)
                else:
                    left.append(qi)
            pending = np.asarray(left, dtype=np.int64)
            m = min(total, m * GROWTH)
            first = False
        self.stats["queries"] += n_q
        return scores, ids


@SEARCHERS.register("smooth_chamfer")
def smooth_chamfer_searcher(
    database: np.ndarray, max_k: int, *, alpha: float = 16.0, centered: bool = False, shortlist: int = 32
) -> SmoothChamferSearch:
    return SmoothChamferSearch(database, alpha=alpha, centered=centered, shortlist=shortlist)
