"""Queries per second of `langdml search` against a 100k x 512 gallery (exact flat index) and its start-up time.

A synthetic gallery of unit vectors is written as an index of the trained model in data/model (so its
fingerprint matches; run `dvc repro` first), then: the start-up (a fresh process: imports, model, index, the
first search, which builds the flat index), one query at a time and batches of 64, after the load.

    python benchmarks/search_speed.py
    python benchmarks/search_speed.py --gallery 100000 --dim 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


def build(index_dir: Path, n: int, dim: int) -> None:
    from stages.core.model.saved import WEIGHTS_NAME
    from stages.core.model.similarity import COSINE
    from stages.core.serving.index import model_fingerprint, write_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = pa.table(
        {
            "row": pa.array(range(n), pa.int64()),
            "path": [f"item{i}.png" for i in range(n)],
            "label": pa.array(np.arange(n) % 1000, pa.int64()),
            "class_name": [f"class {i % 1000}" for i in range(n)],
        }
    )
    write_index(index_dir, x, items, model_fingerprint(REPO / "data/model" / WEIGHTS_NAME), COSINE)


def worker(index_dir: Path, dim: int, threads: int) -> dict[str, float]:
    t0 = time.perf_counter()
    import faiss
    import torch

    from stages.core.serving.api import Retriever

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    retriever = Retriever.load(REPO / "data/model", index_dir)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((64 * 20, dim), dtype=np.float32)
    retriever.search(queries[:1], 10)  # the first search builds the flat index
    startup = time.perf_counter() - t0
    singles = []
    for i in range(50):
        t = time.perf_counter()
        retriever.search(queries[i : i + 1], 10)
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    for b in range(20):
        retriever.search(queries[b * 64 : (b + 1) * 64], 10)
    batched = 20 * 64 / (time.perf_counter() - t)
    return {"startup_s": startup, "single_ms": 1000 * float(np.median(singles)), "batch64_qps": batched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dim, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        build(index_dir, args.gallery, args.dim)
        cmd = [sys.executable, __file__, "--worker", str(index_dir), "--dim", str(args.dim)]
        done = subprocess.run([*cmd, "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"gallery {args.gallery} x {args.dim}, exact flat index, {args.threads} threads")
    print(f"start-up (imports + model + index + first search): {r['startup_s']:.2f} s")
    print(f"one query: {r['single_ms']:.1f} ms median ({1000 / r['single_ms']:.0f} queries/s)")
    print(f"batches of 64: {r['batch64_qps']:.0f} queries/s")


if __name__ == "__main__":
    main()
