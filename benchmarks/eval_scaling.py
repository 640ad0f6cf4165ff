"""Time and peak memory of ``retrieval_metrics`` vs pytorch-metric-learning's ``AccuracyCalculator``.

Each (configuration, size, method) runs in a fresh subprocess that makes the call once (the first call: imports,
kernels, caches) and then ``--repeats`` more times (warm, the median reported), so a fresh process's cost and a
long-lived one's are both shown; ``ru_maxrss`` (which also sees faiss' and BLAS' allocations) is that process's
peak. The data are synthetic clustered unit vectors, the same for both methods (same seed), over a grid of
cluster tightness (``--noise``: 2.5 loose, 1.5 tight) and class size (``--per-class``: 5 as SOP, 60 as CUB/Cars).
Both compute the same neighbour metrics (Recall@1 = PML's precision_at_1, MAP@R, R-precision), so the "same"
column checks that they agree. Threads are left at the libraries' defaults, as the evaluate stage runs
(``--threads N`` pins torch, faiss and numba); the header prints them and this machine's float32 matmul rate.
``--nmi-sop`` adds the NMI row at SOP scale (N x 512, one class per ~5.3 images: 11,318 at 60k): ours (k-means++
seeds, as many runs as the FLOP budget allows) over ``--nmi-seeds``, and, with ``--nmi-reference``, faiss' random
starts with 5 restarts (what evaluation did before), for the spread.

    .venv/bin/python benchmarks/eval_scaling.py              # 1k .. 100k x 512, noise 2.5 and 1.5, 5 and 60 a class
    .venv/bin/python benchmarks/eval_scaling.py --sizes 60000 --noise 2.5 --per-class 50
    .venv/bin/python benchmarks/eval_scaling.py --sizes 60000 --no-pml --nmi-sop --nmi-reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def clustered(n: int, dim: int, per_class: float, noise: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors in ``n / per_class`` clusters of spread ``noise`` (recall@1 below 1: the ranking
    matters; a smaller noise is tighter)."""
    rng = np.random.default_rng(seed)
    n_classes = max(2, round(n / per_class))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    labels = rng.permutation(np.arange(n) % n_classes)
    x = centres[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_gflops(threads: int, dim: int = 512, n: int = 4096, repeats: int = 5, dtype: str = "float32") -> float:
    """This machine's matrix-product rate (torch) in ``dtype``, best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, dim).to(getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a.T
        best = min(best, time.perf_counter() - start)
    return 2 * n * n * dim / best / 1e9


def worker(args: argparse.Namespace) -> None:
    import faiss
    import torch

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    x, y = clustered(args.n, args.dim, args.per_class, args.noise)
    if args.worker == "langdml":
        from stages.core.evaluation.metrics import retrieval_metrics

        def call() -> dict[str, float]:
            return retrieval_metrics(x, query_labels=y, ks=(1, 2, 4, 8), nmi=False)

    elif args.worker in ("nmi", "nmi-reference"):
        from stages.core.evaluation.nmi import kmeans_assign, normalized_mutual_info

        def call() -> dict[str, float]:
            classes = len(np.unique(y))
            if args.worker == "nmi":
                clusters = kmeans_assign(x, classes, seed=args.seed)
            else:  # what evaluation did before: faiss' random starts, the best of 5
                km = faiss.Kmeans(
                    x.shape[1],
                    classes,
                    niter=20,
                    nredo=5,
                    seed=args.seed,
                    min_points_per_centroid=1,
                    max_points_per_centroid=-(-len(x) // classes),
                )
                km.train(x)
                clusters = km.index.search(x, 1)[1][:, 0]
            return {"nmi": normalized_mutual_info(y, clusters)}

    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        include = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
        calc = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def call() -> dict[str, float]:
            out = calc.get_accuracy(xt, yt, ref_includes_query=True)
            names = {"precision_at_1": "recall@1", "mean_average_precision_at_r": "map@r"}
            return {names.get(k, k): float(v) for k, v in out.items()}

    base = _rss_mb()
    times = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        metrics = call()
        times.append(time.perf_counter() - start)
    peak = _rss_mb()
    warm = statistics.median(times[1:]) if args.repeats else float("nan")
    out = {"first": times[0], "warm": warm, "peak_mb": peak, "extra_mb": peak - base, "metrics": metrics}
    print(json.dumps(out))


def _run(
    args: argparse.Namespace, method: str, n: int, per_class: float, noise: float, seed: int = 0, repeats: int = 0
) -> dict | str:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(args.dim)]
    cmd += ["--per-class", str(per_class), "--noise", str(noise), "--seed", str(seed), "--repeats", str(repeats)]
    cmd += ["--threads", str(args.threads or 0)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _thread_counts() -> str:
    import faiss
    import numba
    import torch

    return f"torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}, numba {numba.get_num_threads()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 30_000, 60_000, 100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, nargs="+", default=[2.5, 1.5], help="cluster spreads (smaller: tighter)")
    ap.add_argument("--per-class", type=float, nargs="+", default=[5, 60], help="images per class (SOP ~5, CUB ~60)")
    ap.add_argument("--repeats", type=int, default=3, help="warm calls after the first, in the same process")
    ap.add_argument("--threads", type=int, default=None, help="pin torch/faiss/numba threads (default: theirs)")
    ap.add_argument("--pml-max", type=int, default=100_000, help="largest size to run PML on")
    ap.add_argument("--no-pml", action="store_true", help="ours only")
    ap.add_argument("--nmi-sop", action="store_true", help="the NMI row at SOP scale for each size")
    ap.add_argument("--nmi-seeds", type=int, default=1, help="k-means seeds of our NMI row (its spread)")
    ap.add_argument("--nmi-reference", action="store_true", help="also faiss random starts x 5 (slow)")
    ap.add_argument("--worker", choices=["langdml", "pml", "nmi", "nmi-reference"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.per_class, args.noise = args.per_class[0], args.noise[0]
        args.threads = args.threads or None
        return worker(args)

    from stages.core.evaluation.lowp import choose_precision
    from stages.core.evaluation.metrics import SELF_SEARCH_MIN_ROWS

    threads = args.threads or os.cpu_count() or 1
    rate = matmul_gflops(threads)
    bf16 = matmul_gflops(threads, n=1024, repeats=2, dtype="bfloat16")
    pinned = f"pinned to {args.threads}" if args.threads else "library defaults"
    print(
        f"dim {args.dim}; threads: {pinned} ({_thread_counts()}); float32 matmul {rate:.0f} GFLOP/s, bfloat16 "
        f"{bf16:.1f} (torch); the self-search's first pass chosen here: {choose_precision('cpu', args.dim, 4.0)}; "
        f"flat index below {SELF_SEARCH_MIN_ROWS} rows; first = a fresh process's first call, warm = median of "
        f"{args.repeats} more; extra = peak RSS growth over the calls"
    )
    header = f"{'N':>7} {'method':<8} {'first s':>8} {'warm s':>8} {'peak MB':>8} {'extra MB':>9} {'recall@1':>9}"
    for noise in args.noise:
        for per_class in args.per_class:
            print(f"\nnoise {noise}, {per_class:g} images per class")
            print(header + f" {'map@r':>7} {'PML/ours first':>15} {'PML/ours warm':>14} {'same':>5}")
            for n in args.sizes:
                rows = {}
                for method in ("langdml", "pml"):
                    if method == "pml" and (args.no_pml or n > args.pml_max):
                        continue
                    r = _run(args, method, n, per_class, noise, repeats=args.repeats)
                    if isinstance(r, str):
                        print(f"{n:>7} {method:<8} {r}")
                        continue
                    rows[method] = r
                    m = r["metrics"]
                    line = f"{n:>7} {method:<8} {r['first']:>8.2f} {r['warm']:>8.2f} {r['peak_mb']:>8.0f}"
                    line += f" {r['extra_mb']:>9.0f} {m['recall@1']:>9.4f} {m['map@r']:>7.4f}"
                    ours = rows.get("langdml")
                    if method == "pml" and ours:
                        same = all(abs(ours["metrics"][k] - m[k]) < 1e-6 for k in ("recall@1", "map@r", "r_precision"))
                        line += f" {r['first'] / ours['first']:>15.2f} {r['warm'] / ours['warm']:>14.2f}"
                        line += f" {'yes' if same else 'NO':>5}"
                    print(line, flush=True)
    if args.nmi_sop:
        print(f"\nNMI at SOP scale (~{args.dim}-d, 60,000 / 11,318 = 5.3 images per class)")
        for n in args.sizes:
            per_class = 60_000 / 11_318
            for method, seeds in (("nmi", range(args.nmi_seeds)), ("nmi-reference", range(args.nmi_reference))):
                for seed in seeds:
                    r = _run(args, method, n, per_class, args.noise[0], seed)
                    label = "ours (k-means++)" if method == "nmi" else "faiss random x5"
                    if isinstance(r, str):
                        print(f"{n:>7} {label:<18} seed {seed}: {r}")
                    else:
                        print(f"{n:>7} {label:<18} seed {seed}: NMI {r['metrics']['nmi']:.4f} in {r['first']:.1f} s")


if __name__ == "__main__":
    main()
