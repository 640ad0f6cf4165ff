"""Set retrieval (N x K x D, smooth-Chamfer): certified shortlist vs brute force, time and peak memory.

Each (size, method) runs in a fresh subprocess so that ``ru_maxrss`` is that run's own peak. The data
are synthetic clustered sets of K unit slots (``--per-class`` sets per class), the same for both methods.
Both compute leave-one-out Recall@k and MAP@R through ``retrieval_metrics`` (so MAP@R certifies the top R):
brute force scores every pair with ``smooth_chamfer`` in query chunks and sorts; the shortlist searches
each query slot's top-M gallery slots with faiss, re-ranks the owners exactly and certifies the top-k by
the upper bound (``stages/core/evaluation/set_search.py``). "same" checks that the metrics agree; "certified" is the
fraction of queries certified at the first M.

    .venv/bin/python benchmarks/set_retrieval.py                       # 5k, 10k, 30k x 4 x 512
    .venv/bin/python benchmarks/set_retrieval.py --sizes 5000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def clustered_sets(
    n: int, k: int, dim: int, per_class: int, noise: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sets of ``k`` unit slots in ``n // per_class`` classes (each class: k slot centres), plus
    Gaussian noise of ``noise`` times the centres' scale (same-class slot cosine about 1 / (1 + noise^2))."""
    rng = np.random.default_rng(seed)
    n_classes = max(2, n // per_class)
    centres = rng.standard_normal((n_classes, k, dim), dtype=np.float32)
    labels = rng.permutation(np.arange(n) % n_classes)
    x = centres[labels] + noise * rng.standard_normal((n, k, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x, labels.astype(np.int64)


def brute_force_searcher(database: np.ndarray, max_k: int, alpha: float = 16.0):
    """Every pair scored, then sorted: the reference the certified search must equal."""
    import torch

    from stages.core.model.similarity import smooth_chamfer

    gallery = torch.tensor(database, dtype=torch.float64)  # the precision the certified search re-ranks in

    def search(queries: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for start in range(0, len(queries), 256):
            q = torch.tensor(queries[start : start + 256], dtype=torch.float64)
            s = smooth_chamfer(q, gallery, alpha=alpha).numpy()
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores.append(np.take_along_axis(s, order, axis=1))
            ids.append(order)
        return np.concatenate(scores), np.concatenate(ids)

    return search


def worker(args: argparse.Namespace) -> None:
    import faiss
    import torch

    from stages.core.evaluation.metrics import retrieval_metrics
    from stages.core.evaluation.search import flat_ip_searcher
    from stages.core.evaluation.set_search import SmoothChamferSearch
    from stages.core.model.similarity import SimilaritySpec

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    x, y = clustered_sets(args.n, args.slots, args.dim, args.per_class, args.noise)
    made: list[SmoothChamferSearch] = []

    def certified(database: np.ndarray, max_k: int) -> SmoothChamferSearch:
        made.append(SmoothChamferSearch(database, flat_ip_searcher, alpha=16.0, shortlist=args.shortlist))
        return made[-1]

    searcher = certified if args.worker == "shortlist" else brute_force_searcher
    base = _rss_mb()
    t0 = time.perf_counter()
    m = retrieval_metrics(
        x, query_labels=y, ks=(1, 2, 4, 8), similarity=SimilaritySpec("smooth_chamfer"), searcher=searcher, nmi=False
    )
    seconds = time.perf_counter() - t0
    stats = made[0].stats if made else {}
    out = {
        "seconds": seconds,
        "peak_mb": _rss_mb(),
        "extra_mb": _rss_mb() - base,
        "recall@1": m["recall@1"],
        "map@r": m["map@r"],
        "certified": stats.get("certified_first", 0) / max(stats.get("queries", 1), 1),
    }
    print(json.dumps(out))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 30000])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--noise", type=float, default=1.0, help="1.0: same-class slot cosine ~0.5; 2.0: ~0.2 (hard)")
    ap.add_argument("--shortlist", type=int, default=32, help="first M per query slot (grows x4 when not certified)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-brute-above", type=int, default=30000, help="no brute force above this N")
    ap.add_argument("--worker", choices=["shortlist", "brute"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"| N x {args.slots} x {args.dim} | shortlist (s) | peak / extra MB | certified at first M | "
        "brute force (s) | peak / extra MB | speed-up | same |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        runs = {}
        for method in ("shortlist", "brute"):
            if method == "brute" and n > args.skip_brute_above:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--n",
                str(n),
                "--slots",
                str(args.slots),
                "--dim",
                str(args.dim),
                "--per-class",
                str(args.per_class),
                "--shortlist",
                str(args.shortlist),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[method] = json.loads(res.stdout.strip().splitlines()[-1])
        s, b = runs["shortlist"], runs.get("brute")
        cells = [
            f"{n:,}",
            f"{s['seconds']:.1f}",
            f"{s['peak_mb']:.0f} / {s['extra_mb']:.0f}",
            f"{100 * s['certified']:.1f}%",
        ]
        if b:
            same = s["recall@1"] == b["recall@1"] and abs(s["map@r"] - b["map@r"]) < 1e-9
            cells += [
                f"{b['seconds']:.1f}",
                f"{b['peak_mb']:.0f} / {b['extra_mb']:.0f}",
                f"{b['seconds'] / s['seconds']:.1f}x",
                "yes" if same else "NO",
            ]
        else:
            cells += ["-", "-", "-", "-"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
