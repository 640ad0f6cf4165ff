"""Image-text retrieval metrics: image-to-text and text-to-image Recall@k and RSUM (the VSE / DivE protocol)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.evaluation.search import top_k
from stages.core.model.similarity import COSINE, SimilaritySpec

# Image x caption set pairs up to which cross-modal recall scores every pair (chunked, one pass for both
# directions) instead of running the certified search twice: at COCO-5K size (1.25e8 pairs, K = 4, 256-d)
# that is 27 s against 244 s on 2 CPU cores (benchmarks/crossmodal_eval.py).
CROSSMODAL_BRUTE_PAIRS = 2**28


def _set_top_k_both(
    images: np.ndarray,
    captions: np.ndarray,
    k_i2t: int,
    k_t2i: int,
    similarity: SimilaritySpec,
    device: str = "cpu",
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact smooth-Chamfer top-k in both directions from one chunked pass over all pairs on ``device``: per
    image its ``k_i2t`` best captions, per caption its ``k_t2i`` best images (a running top-k merged chunk by
    chunk)."""
    import torch

    def on_device(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)

    caps = on_device(captions)
    best_s = torch.full((len(captions), 0), -torch.inf, device=device)
    best_i = torch.zeros((len(captions), 0), dtype=torch.long, device=device)
    i2t = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            scores = similarity(on_device(images[start : start + chunk]), caps)  # chunk x captions
            i2t.append(scores.topk(k_i2t, dim=1).indices.cpu().numpy())
            top_s, top_i = scores.topk(min(k_t2i, scores.shape[0]), dim=0)
            merged_s = torch.cat([best_s, top_s.T], dim=1)
            merged_i = torch.cat([best_i, top_i.T + start], dim=1)
            keep = merged_s.topk(min(k_t2i, merged_s.shape[1]), dim=1).indices
            best_s, best_i = merged_s.gather(1, keep), merged_i.gather(1, keep)
    return np.concatenate(i2t), best_i.cpu().numpy()


def crossmodal_recall(
    images: np.ndarray,
    captions: np.ndarray,
    caption_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    similarity: SimilaritySpec = COSINE,
    brute_force_pairs: int = CROSSMODAL_BRUTE_PAIRS,
    device: str = "cpu",
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k in percent, and their sum ``rsum`` (the VSE / DivE protocol).

    ``images`` (N x D, or N x K x D sets) and ``captions`` (M x D or M x K x D); ``caption_to_image[j]``
    is the row of caption j's image. i2t: an image is a hit at k when any of its captions is among its k
    best captions; t2i: a caption is a hit when its image is among its k best images. Exact search by the
    searcher of ``similarity`` (``smooth_chamfer``: the certified set search, so thousands of images x
    tens of thousands of captions need no full score matrix); up to ``brute_force_pairs`` set pairs every
    pair is scored instead, in chunks on ``device`` (a torch device name), which is faster there (see
    :data:`CROSSMODAL_BRUTE_PAIRS`).
    """
    owner = np.asarray(caption_to_image, dtype=np.int64)
    n, m = len(images), len(captions)
    if owner.shape != (m,) or (m and (owner.min() < 0 or owner.max() >= n)):
        raise LangdmlError(f"caption_to_image must give one image row in 0..{n - 1} per caption ({m})")
    if np.bincount(owner, minlength=n).min(initial=1) == 0:
        raise LangdmlError("every image needs at least one caption for image-to-text recall")
    ks = sorted(set(ks))
    k_i2t, k_t2i = min(max(ks), m), min(max(ks), n)
    if similarity.sets and n * m <= brute_force_pairs:
        sets = [similarity.layout(x) for x in (images, captions)]
        best_caps, best_imgs = _set_top_k_both(*sets, k_i2t, k_t2i, similarity, device=device)
    else:
        best_caps = top_k(images, captions, k_i2t, similarity)
        best_imgs = top_k(captions, images, k_t2i, similarity)
    i2t = owner[best_caps] == np.arange(n)[:, None]
    t2i = best_imgs == owner[:, None]
    out: dict[str, float] = {}
    for name, hits in (("i2t", i2t), ("t2i", t2i)):
        first = np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])  # rank of the first hit
        for k in ks:
            out[f"{name}/recall@{k}"] = 100.0 * float(np.mean(first < k))
    out["rsum"] = sum(v for key, v in out.items() if "/recall@" in key)
    return out


def crossmodal_recall_folds(
    images: np.ndarray, captions: np.ndarray, caption_to_image: np.ndarray, folds: int, **kwargs: Any
) -> dict[str, float]:
    """The mean of :func:`crossmodal_recall` over ``folds`` consecutive blocks of images, each with its
    captions (the COCO 1K protocol: 5 folds of the 5,000 test images)."""
    owner = np.asarray(caption_to_image, dtype=np.int64)
    bounds = np.linspace(0, len(images), folds + 1).round().astype(int)
    runs = []
    for lo, hi in itertools.pairwise(bounds):
        mine = (owner >= lo) & (owner < hi)
        runs.append(crossmodal_recall(images[lo:hi], captions[mine], owner[mine] - lo, **kwargs))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
