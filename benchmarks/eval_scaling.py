"""Time and peak memory of ``retrieval_metrics`` vs pytorch-metric-learning's ``AccuracyCalculator``.

Each (size, method) runs in a fresh subprocess so that ``ru_maxrss`` (which also sees faiss' and
BLAS' allocations, unlike tracemalloc) is that run's own peak. The data are synthetic clustered
unit vectors, the same for both methods (same seed). Both compute the same neighbour metrics
(Recall@1 = PML's precision_at_1, MAP@R, R-precision) and NMI by faiss k-means (20 iterations),
so the "same" column checks that they agree.

    .venv/bin/python benchmarks/eval_scaling.py                      # 10k, 30k, 60k x 512
    .venv/bin/python benchmarks/eval_scaling.py --sizes 60000 --per-class 5 --no-nmi
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def clustered(n: int, dim: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors in ``n // per_class`` noisy clusters (recall@1 well below 1: the ranking matters)."""
    rng = np.random.default_rng(seed)
    n_classes = max(2, n // per_class)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    labels = rng.permutation(np.arange(n) % n_classes)
    x = centres[labels] + 2.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    x, y = clustered(args.n, args.dim, args.per_class)
    if args.worker == "langdml":
        from stages.core.evaluation.metrics import retrieval_metrics

        def call() -> dict[str, float]:
            return retrieval_metrics(x, query_labels=y, ks=(1, 2, 4, 8), nmi=not args.no_nmi)

    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        include = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
        calc = AccuracyCalculator(
            include=include if args.no_nmi else (*include, "NMI"), k="max_bin_count", device=torch.device("cpu")
        )
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def call() -> dict[str, float]:
            out = calc.get_accuracy(xt, yt, ref_includes_query=True)
            names = {"precision_at_1": "recall@1", "mean_average_precision_at_r": "map@r", "NMI": "nmi"}
            return {names.get(k, k): float(v) for k, v in out.items()}

    base = _rss_mb()
    start = time.perf_counter()
    metrics = call()
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "extra_mb": peak - base, "metrics": metrics}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-class", type=int, default=50, help="images per class (CUB/Cars ~60, SOP ~5)")
    ap.add_argument("--threads", type=int, default=None, help="faiss/torch threads (default: all cores)")
    ap.add_argument("--no-nmi", action="store_true", help="neighbour metrics only (no k-means)")
    ap.add_argument("--pml-max", type=int, default=60_000, help="largest size to run PML on")
    ap.add_argument("--worker", choices=["langdml", "pml"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        import faiss

        args.threads = faiss.omp_get_max_threads()
    if args.worker:
        return worker(args)

    print(
        f"dim {args.dim}, {args.per_class} images per class, {args.threads} threads, "
        f"NMI {'off' if args.no_nmi else 'on'}; peak = ru_maxrss of a fresh process, "
        "extra = peak growth during the call"
    )
    header = f"{'N':>7} {'method':<8} {'seconds':>8} {'peak MB':>8} {'extra MB':>9} {'recall@1':>9} {'map@r':>7}"
    print(header + f" {'PML/ours':>9} {'same':>5}")
    for n in args.sizes:
        rows = {}
        for method in ("langdml", "pml"):
            if method == "pml" and n > args.pml_max:
                print(f"{n:>7} {method:<8} skipped (--pml-max {args.pml_max})")
                continue
            cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(args.dim)]
            cmd += ["--per-class", str(args.per_class), "--threads", str(args.threads)]
            cmd += ["--no-nmi"] if args.no_nmi else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{n:>7} {method:<8} failed (exit {done.returncode}): {tail}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows[method] = r
            m = r["metrics"]
            line = f"{n:>7} {method:<8} {r['seconds']:>8.2f} {r['peak_mb']:>8.0f} {r['extra_mb']:>9.0f}"
            line += f" {m['recall@1']:>9.4f} {m['map@r']:>7.4f}"
            if method == "pml" and "langdml" in rows:
                ours = rows["langdml"]["metrics"]
                same = all(abs(ours[k] - m[k]) < 1e-6 for k in ("recall@1", "map@r", "r_precision"))
                line += f" {r['seconds'] / rows['langdml']['seconds']:>9.2f} {'yes' if same else 'NO':>5}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
