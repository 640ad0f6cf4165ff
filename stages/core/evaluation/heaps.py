"""faiss' top-k heaps (``HeapArray<CMin>``, faiss/utils/Heap.h) as numba kernels fed by blocks of a product.

The symmetric self-search multiplies each block (I, J) of the upper triangle once and feeds it to the heaps
of rows I (along its rows) and of rows J (down its columns). Through faiss' Python API every block costs
group maxima, index arithmetic and copies in torch before faiss sees a value (~30% of the products' time on 2
cores). :func:`feed_block` reads the block in place instead: 32 entries at a time are tested against the heap
root with one vectorised comparison, and only a run that holds a candidate is walked. Threads own disjoint
heap rows (rows of I, then column tiles of J), so the result does not depend on the thread count.

The heaps are faiss' own, so the result is a flat index's, ties included:
- a min-heap whose root is the worst entry in ``CMin::cmp2`` order: the smaller score, then the smaller id;
- an entry enters only if its score is strictly above the root's (``CMin::cmp(root, value)``);
- each row receives its candidates in increasing id order, as a flat index feeds them;
- empty slots hold ``-FLT_MAX`` and id -1 (``CMin::neutral``); :func:`best_first` orders a row as
  ``heap_reorder`` does: score descending, then id descending.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Entries tested at once against a heap root, and the columns of J one thread owns in the transposed pass.
RUN = 32
TILE = 64


def new_heaps(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` empty heaps of ``k`` slots: (scores, ids), as faiss' ``heapify`` leaves them."""
    return np.full((n, k), np.finfo(np.float32).min, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


@njit(inline="always")
def _worse(v1: float, i1: int, v2: float, i2: int) -> bool:
    """faiss ``CMin::cmp2``: (v1, i1) sits nearer the root than (v2, i2)."""
    return v1 < v2 or (v1 == v2 and i1 < i2)


@njit(inline="always")
def _replace_top(vals: np.ndarray, ids: np.ndarray, value: float, idx: int) -> None:
    """faiss ``heap_replace_top``: the root replaced by (value, idx), sifted down."""
    k = len(vals)
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and _worse(vals[child + 1], ids[child + 1], vals[child], ids[child]):
            child += 1
        if _worse(value, idx, vals[child], ids[child]):
            break
        vals[pos] = vals[child]
        ids[pos] = ids[child]
        pos = child
    vals[pos] = value
    ids[pos] = idx


@njit(nogil=True, parallel=True, cache=True)
def feed_block(s: np.ndarray, row0: int, col0: int, transposed: bool, vals: np.ndarray, ids: np.ndarray) -> None:
    """Feed ``s`` (rows ``row0..``, columns ``col0..`` of the product) to the heaps of its rows (ids
    ``col0..``) and, when ``transposed``, to the heaps of its columns (ids ``row0..``)."""
    rows, cols = s.shape
    for ii in prange(rows):
        i = row0 + ii
        root = vals[i, 0]
        for start in range(0, cols, RUN):
            stop = min(cols, start + RUN)
            hit = False
            for jj in range(start, stop):
                hit |= s[ii, jj] > root
            if hit:
                for jj in range(start, stop):
                    if s[ii, jj] > root:
                        _replace_top(vals[i], ids[i], s[ii, jj], col0 + jj)
                        root = vals[i, 0]
    if transposed:
        for tile in prange((cols + TILE - 1) // TILE):
            c0 = tile * TILE
            c1 = min(cols, c0 + TILE)
            roots = vals[col0 + c0 : col0 + c1, 0].copy()
            for ii in range(rows):
                hit = False
                for jj in range(c0, c1):
                    hit |= s[ii, jj] > roots[jj - c0]
                if hit:
                    for jj in range(c0, c1):
                        if s[ii, jj] > roots[jj - c0]:
                            j = col0 + jj
                            _replace_top(vals[j], ids[j], s[ii, jj], row0 + ii)
                            roots[jj - c0] = vals[j, 0]


def best_first(vals: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each heap's entries in faiss' ``heap_reorder`` order: score descending, then id descending."""
    order = np.lexsort((-ids, -vals))
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(ids, order, axis=1)


def compile_kernels() -> None:
    """Compile :func:`feed_block` for the types the self-search feeds it (a C-contiguous float32 block, float32 and
    int64 heaps) into numba's on-disk cache beside this file. ``make venv`` calls it, so a fresh clone's first
    evaluation does not spend 2.5-7 s compiling (numba recompiles only when this file changes)."""
    vals, ids = new_heaps(2, 1)
    feed_block(np.zeros((2, 2), dtype=np.float32), 0, 0, True, vals, ids)
