"""Time and peak memory of ``retrieval_metrics`` vs pytorch-metric-learning's ``AccuracyCalculator``.

Each (size, method) runs in a fresh subprocess so that ``ru_maxrss`` (which also sees faiss' and
BLAS' allocations, unlike tracemalloc) is that run's own peak. The data are synthetic clustered
unit vectors, the same for both methods (same seed). Both compute the same neighbour metrics
(Recall@1 = PML's precision_at_1, MAP@R, R-precision), so the "same" column checks that they agree.
The same run measures this machine's float32 matmul rate (torch, 4096 x 512 x 4096) and the fraction of
it that our search reaches (the arithmetic it does: N^2 D for the symmetric self-search, over its time).
``--nmi-sop`` adds the NMI row at SOP scale (N x 512, one class per ~5.3 images: 11,318 at 60k): ours
(k-means++ seeds, as many runs as the FLOP budget allows) over ``--nmi-seeds``, and, with
``--nmi-reference``, faiss' random starts with 5 restarts (what evaluation did before), for the spread.

    .venv/bin/python benchmarks/eval_scaling.py                      # 10k, 30k, 60k, 100k x 512
    .venv/bin/python benchmarks/eval_scaling.py --sizes 60000 --no-pml --nmi-sop --nmi-reference
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def clustered(n: int, dim: int, per_class: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors in ``n / per_class`` noisy clusters (recall@1 well below 1: the ranking matters)."""
    rng = np.random.default_rng(seed)
    n_classes = max(2, round(n / per_class))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    labels = rng.permutation(np.arange(n) % n_classes)
    x = centres[labels] + 2.5 * rng.standard_normal((n, dim), dtype=np.float32)
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

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    x, y = clustered(args.n, args.dim, args.per_class)
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
    start = time.perf_counter()
    metrics = call()
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "extra_mb": peak - base, "metrics": metrics}))


def _run(args: argparse.Namespace, method: str, n: int, per_class: float, seed: int = 0) -> dict | str:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(args.dim)]
    cmd += ["--per-class", str(per_class), "--threads", str(args.threads), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000, 100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-class", type=float, default=50, help="images per class (CUB/Cars ~60, SOP ~5.3)")
    ap.add_argument("--threads", type=int, default=None, help="faiss/torch threads (default: all cores)")
    ap.add_argument("--pml-max", type=int, default=100_000, help="largest size to run PML on")
    ap.add_argument("--no-pml", action="store_true", help="ours only")
    ap.add_argument("--nmi-sop", action="store_true", help="the NMI row at SOP scale for each size")
    ap.add_argument("--nmi-seeds", type=int, default=1, help="k-means seeds of our NMI row (its spread)")
    ap.add_argument("--nmi-reference", action="store_true", help="also faiss random starts x 5 (slow)")
    ap.add_argument("--worker", choices=["langdml", "pml", "nmi", "nmi-reference"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        import faiss

        args.threads = faiss.omp_get_max_threads()
    if args.worker:
        return worker(args)

    from stages.core.evaluation.lowp import choose_precision

    rate = matmul_gflops(args.threads)
    bf16 = matmul_gflops(args.threads, n=1024, repeats=2, dtype="bfloat16")
    print(
        f"dim {args.dim}, {args.per_class} images per class, {args.threads} threads; float32 matmul "
        f"{rate:.0f} GFLOP/s, bfloat16 {bf16:.1f} (torch); the self-search's first pass chosen here: "
        f"{choose_precision('cpu', args.dim, 4.0)}; peak = ru_maxrss of a fresh process, extra = peak growth "
        "during the call"
    )
    header = f"{'N':>7} {'method':<8} {'seconds':>8} {'peak MB':>8} {'extra MB':>9} {'recall@1':>9} {'map@r':>7}"
    print(header + f" {'of matmul':>9} {'PML/ours':>9} {'same':>5}")
    for n in args.sizes:
        rows = {}
        for method in ("langdml", "pml"):
            if method == "pml" and (args.no_pml or n > args.pml_max):
                continue
            r = _run(args, method, n, args.per_class)
            if isinstance(r, str):
                print(f"{n:>7} {method:<8} {r}")
                continue
            rows[method] = r
            m = r["metrics"]
            line = f"{n:>7} {method:<8} {r['seconds']:>8.2f} {r['peak_mb']:>8.0f} {r['extra_mb']:>9.0f}"
            line += f" {m['recall@1']:>9.4f} {m['map@r']:>7.4f}"
            if method == "langdml":  # the symmetric self-search multiplies the upper triangle: N^2 D flop
                line += f" {n * n * args.dim / r['seconds'] / 1e9 / rate:>9.2f}"
            else:
                ours = rows.get("langdml")
                same = ours and all(abs(ours["metrics"][k] - m[k]) < 1e-6 for k in ("recall@1", "map@r", "r_precision"))
                speed = f"{r['seconds'] / ours['seconds']:>9.2f}" if ours else f"{'':>9}"
                line += f" {'':>9} {speed} {'yes' if same else 'NO':>5}"
            print(line, flush=True)
    if args.nmi_sop:
        print(f"\nNMI at SOP scale (~{args.dim}-d, 60,000 / 11,318 = 5.3 images per class)")
        for n in args.sizes:
            per_class = 60_000 / 11_318
            for method, seeds in (("nmi", range(args.nmi_seeds)), ("nmi-reference", range(args.nmi_reference))):
                for seed in seeds:
                    r = _run(args, method, n, per_class, seed)
                    label = "ours (k-means++)" if method == "nmi" else "faiss random x5"
                    if isinstance(r, str):
                        print(f"{n:>7} {label:<18} seed {seed}: {r}")
                    else:
                        print(f"{n:>7} {label:<18} seed {seed}: NMI {r['metrics']['nmi']:.4f} in {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
