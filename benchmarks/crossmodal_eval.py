"""Time `crossmodal_recall` at COCO-5K size: 5,000 images x 25,000 captions (5 each), K slots of D dims.

Synthetic sets: each caption's slots are noisy copies of its image's slots, so the retrieval task has an answer;
`--noise` sets how hard it is. Exact smooth-Chamfer scores, never a whole 5,000 x 25,000 x K x K tensor: up
to `CROSSMODAL_BRUTE_PAIRS` set pairs every pair is scored in chunks, in one pass for both directions (29 s
here at 5K, K = 4, 256-d); the certified search took 244 s for the same (it pays per query for shortlists
that this size does not need).

    python benchmarks/crossmodal_eval.py --images 5000 --per-image 5 --slots 4 --dim 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stages.core.evaluation.crossmodal import crossmodal_recall
from stages.core.model.similarity import SimilaritySpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--noise", type=float, default=1.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, k, d = args.images, args.slots, args.dim
    images = rng.normal(size=(n, k, d)).astype(np.float32)
    owner = np.repeat(np.arange(n), args.per_image)
    captions = images[owner] + args.noise * rng.normal(size=(len(owner), k, d)).astype(np.float32)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=-1, keepdims=True)
    t0 = time.perf_counter()
    metrics = crossmodal_recall(images, captions, owner, similarity=SimilaritySpec("smooth_chamfer", alpha=16.0))
    took = time.perf_counter() - t0
    print("| images x captions | K | D | seconds | i2t R@1 | t2i R@1 | rsum |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {n:,} x {len(owner):,} | {k} | {d} | {took:.1f} | {metrics['i2t/recall@1']:.1f} | "
        f"{metrics['t2i/recall@1']:.1f} | {metrics['rsum']:.1f} |"
    )


if __name__ == "__main__":
    main()
