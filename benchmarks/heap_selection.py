"""Where the self-search's selection time goes: the scan against each heap's root, or the heaps' replacements.

The upper-triangle products of an N x 512 clustered set (benchmarks/eval_scaling.py's data) are made once and
kept; then they are fed to empty heaps of depth k (``heaps.feed_block``, as ``search.self_search`` feeds them) for
each ``--depths`` value, ``--repeats`` times, the median printed beside the products' own time. At depth 1 almost
no entry beats a root, so that row is the scan alone; the rows above it add the replacements (about
k (1 + ln(N / k)) per row for rows that arrive in random order) and the runs walked to find them. Keeps every
block in memory: N = 30,000 needs ~1.9 GB.

    .venv/bin/python benchmarks/heap_selection.py                      # 30k, depths 1, 10, 60
    .venv/bin/python benchmarks/heap_selection.py --n 20000 --depths 1 60 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000, help="rows")
    ap.add_argument("--per-class", type=float, default=60, help="images a class")
    ap.add_argument("--noise", type=float, default=1.5, help="cluster spread (eval_scaling's 1.5: tight)")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 10, 60], help="heap depths k")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numba
    import torch
    from eval_scaling import clustered

    from stages.core.evaluation import heaps
    from stages.core.evaluation.search import SELF_BLOCK

    heaps.compile_kernels()
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    x, _ = clustered(args.n, 512, args.per_class, args.noise)
    rows = torch.from_numpy(x)
    start = time.perf_counter()
    blocks = [
        (i0, j0, (rows[i0 : i0 + SELF_BLOCK] @ rows[j0 : j0 + SELF_BLOCK].T).numpy())
        for i0 in range(0, args.n, SELF_BLOCK)
        for j0 in range(i0, args.n, SELF_BLOCK)
    ]
    products = time.perf_counter() - start
    warm_vals, warm_ids = heaps.new_heaps(args.n, 1)
    heaps.feed_block(blocks[0][2], 0, 0, False, warm_vals, warm_ids)  # starts numba's thread pool
    print(
        f"{args.n:,} x 512, {args.per_class:g} a class, noise {args.noise}: products {products:.2f} s "
        f"({len(blocks)} blocks of {SELF_BLOCK}, torch {torch.get_num_threads()} threads, numba "
        f"{numba.get_num_threads()})"
    )
    print("| heap depth k | feed seconds (median) | runs |")
    print("|---|---|---|")
    for k in args.depths:
        times = []
        for _ in range(args.repeats):
            vals, ids = heaps.new_heaps(args.n, k)
            start = time.perf_counter()
            for i0, j0, s in blocks:
                heaps.feed_block(s, i0, j0, j0 > i0, vals, ids)
            times.append(time.perf_counter() - start)
        print(f"| {k} | {statistics.median(times):.3f} | {' '.join(f'{t:.3f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
