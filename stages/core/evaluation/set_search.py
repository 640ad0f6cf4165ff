"""Exact top-k retrieval of sets under smooth-Chamfer, without scoring every pair when it can.

Brute force costs K1 K2 times the single-vector search. Instead, for a chunk of query sets:
1. an exact faiss inner-product index over all N K2 gallery slots gives each query slot i its top-M slots;
   tau_i is the M-th score;
2. every gallery set owning one of its shortlisted slots is a candidate of that query, re-ranked by the
   exact smooth-Chamfer (float64; queries in small padded batches);
3. a set that is not a candidate has all its slot similarities to query slot i at most tau_i, hence
   SC(X, Y) <= U(tau) (:func:`~stages.core.model.similarity.smooth_chamfer_upper_bound`); if a query's k-th exact
   score is at least U, no other set can enter its top-k: the result is certified exact.
   Otherwise M grows (x4) for the uncertified queries. Once a query's candidates would be more than
   ``exhaustive_fraction`` of the gallery, it is scored against all of it (brute force, in large
   chunks), so the worst case costs about one brute-force pass plus the slot searches.
The bound is loose by up to (log K1 + log K2)/(2 alpha) (it assumes every slot of an unseen set reaches
tau), so certification is quick where classes are well separated and falls back to brute force where
all sets are nearly equally similar. Ties are broken by the lower gallery index, as a stable sort of
the brute-force scores would. ``stats`` counts the queries certified at the first M and by brute force.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from stages.core.model.similarity import chamfer_from_slot_similarities, smooth_chamfer, smooth_chamfer_upper_bound

GROWTH = 4
QUERY_CHUNK = 16  # queries re-ranked together against their own (padded) candidate lists
BRUTE_CHUNK = 256  # queries scored against the whole gallery at once
GATHER_BUDGET = 2**27  # bytes of gathered candidate sets per re-rank batch (128 MB)
# slot_search(queries, k) -> (scores, ids): an exact inner-product search over the gallery's slots.
SlotSearch = Callable[..., tuple[np.ndarray, np.ndarray]]
# faiss scores are float32: the bound is raised by this much so that rounding can never cut off a set.
BOUND_SLACK = 1e-5


class SmoothChamferSearch:
    """``search(queries Q x K1 x D, k, depth=None) -> (scores Q x k, gallery ids Q x k)``, best first;
    the first ``depth[i]`` results of query i (all k without ``depth``) are exact and certified, the rest
    are the best of its candidates."""

    def __init__(
        self,
        database: np.ndarray,
        slot_searcher: Callable[[np.ndarray, int], SlotSearch],
        alpha: float = 16.0,
        centered: bool = False,
        shortlist: int = 32,
        exhaustive_fraction: float = 0.1,
    ) -> None:
        db = np.ascontiguousarray(database, dtype=np.float32)
        if db.ndim != 3:
            raise ValueError(f"the gallery must be N x K x D sets, got shape {db.shape}")
        self.n, self.k2, self.dim = db.shape
        self.sets = torch.tensor(db, dtype=torch.float64)
        self.slots = db.reshape(-1, self.dim)
        self.owner = np.repeat(np.arange(self.n), self.k2)
        self.alpha, self.centered, self.shortlist = alpha, centered, shortlist
        self.exhaustive_fraction = exhaustive_fraction
        self._make_slot_index = slot_searcher
        self._index: dict[bool, SlotSearch] = {}
        self.stats = {"queries": 0, "certified_first": 0, "brute_force": 0}

    def _slot_search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        small = m <= 2048  # faiss-gpu's largest k; beyond it the CPU index answers
        if small not in self._index:
            self._index[small] = self._make_slot_index(self.slots, m if small else 2049)
        return self._index[small](queries, m)

    def __call__(self, queries: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[2] != self.dim:
            raise ValueError(f"queries must be Q x K x {self.dim} sets, got shape {q.shape}")
        k = min(k, self.n)
        need = np.full(len(q), k) if depth is None else np.clip(np.asarray(depth), 1, k)
        total, k1 = self.n * self.k2, q.shape[1]
        scores = np.empty((len(q), k), dtype=np.float64)
        ids = np.empty((len(q), k), dtype=np.int64)
        pending, brute = np.arange(len(q)), []
        m, first = min(total, max(self.shortlist, 2 * k)), True
        while len(pending) and m < total:
            # One slot search for every pending query (faiss is slow on small batches), then chunks.
            s, idx = self._slot_search(q[pending].reshape(-1, self.dim), m)
            tau = torch.from_numpy(s.reshape(len(pending), k1, m)[:, :, -1].astype(np.float64))
            bound = smooth_chamfer_upper_bound(tau, self.k2, alpha=self.alpha, centered=self.centered).numpy()
            candidates = [np.unique(row) for row in self.owner[idx].reshape(len(pending), -1)]
            too_many = np.array([len(c) > self.exhaustive_fraction * self.n for c in candidates], dtype=bool)
            brute.append(pending[too_many])
            left = [pending[~too_many & np.array([len(c) < k for c in candidates], dtype=bool)]]
            ranked = np.flatnonzero(~too_many & np.array([len(c) >= k for c in candidates], dtype=bool))
            for part in self._batches(ranked, [len(candidates[i]) for i in ranked]):
                rows = pending[part]
                top, top_ids = self._exact_candidates(q[rows], [candidates[i] for i in part], k)
                deepest = np.take_along_axis(top, need[rows, None] - 1, axis=1)[:, 0]
                ok = deepest >= bound[part] + BOUND_SLACK
                scores[rows[ok]], ids[rows[ok]] = top[ok], top_ids[ok]
                self.stats["certified_first"] += int(first) * int(ok.sum())
                left.append(rows[~ok])
            pending = np.concatenate(left)
            m, first = min(total, m * GROWTH), False
        brute.append(pending)
        rest = np.concatenate(brute)
        for start in range(0, len(rest), BRUTE_CHUNK):
            rows = rest[start : start + BRUTE_CHUNK]
            exact = smooth_chamfer(
                torch.tensor(q[rows], dtype=torch.float64), self.sets, alpha=self.alpha, centered=self.centered
            ).numpy()
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # ties: the lower gallery index first
            scores[rows], ids[rows] = np.take_along_axis(exact, order, axis=1), order
        self.stats["queries"] += len(q)
        self.stats["brute_force"] += len(rest)
        return scores, ids

    def _batches(self, ranked: np.ndarray, widths: list[int]) -> list[np.ndarray]:
        """Consecutive groups of at most QUERY_CHUNK queries whose padded candidate sets (float64) stay
        within GATHER_BUDGET bytes."""
        per_set = self.k2 * self.dim * 8
        groups, start = [], 0
        while start < len(ranked):
            stop, widest = start, 0
            while stop < len(ranked) and stop - start < QUERY_CHUNK:
                widest = max(widest, widths[stop])
                if stop > start and (stop - start + 1) * widest * per_set > GATHER_BUDGET:
                    break
                stop += 1
            groups.append(ranked[start:stop])
            start = stop
        return groups

    def _exact_candidates(
        self, queries: np.ndarray, candidates: list[np.ndarray], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query among its own candidates (sorted ids), float64 smooth-Chamfer, padded batch."""
        width = max(len(c) for c in candidates)
        padded = np.full((len(candidates), width), -1, dtype=np.int64)
        for row, c in enumerate(candidates):
            padded[row, : len(c)] = c
        gathered = self.sets[torch.from_numpy(padded.clip(min=0))]  # P x C x K2 x D
        slot_sims = torch.einsum("pkd,pcld->pckl", torch.tensor(queries, dtype=torch.float64), gathered)
        exact = chamfer_from_slot_similarities(slot_sims, self.alpha, self.centered).numpy()
        exact[padded < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # ties: the lower gallery index first
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(padded, order, axis=1)
