"""Cross-modal recall (i2t, t2i, rsum) and the COCO 1K folds against a brute-force NumPy reference;
the VSE++ hardest-negative triplet loss and MMD against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from stages.core.errors import LangdmlError
from stages.core.evaluation.crossmodal import crossmodal_recall, crossmodal_recall_folds
from stages.core.model.set_losses import hardest_negative_triplet, mmd_exp_kernel
from stages.core.model.similarity import SimilaritySpec

torch.set_num_threads(1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def smooth_chamfer_np(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """SC of every set pair (A x K1 x D, B x K2 x D), straight from the formula in float64."""
    s = np.einsum("akd,bld->abkl", a.astype(np.float64), b.astype(np.float64))
    k1, k2 = a.shape[1], b.shape[1]
    return logsumexp(alpha * s, axis=3).sum(2) / (2 * alpha * k1) + logsumexp(alpha * s, axis=2).sum(2) / (
        2 * alpha * k2
    )


def reference(sim: np.ndarray, owner: np.ndarray, ks) -> dict[str, float]:
    """sim: images x captions. i2t: best rank of an own caption; t2i: rank of the own image."""
    n = sim.shape[0]
    out = {}
    i2t_rank = np.array(
        [
            min(np.flatnonzero(np.argsort(-sim[i], kind="stable") == j)[0] for j in np.flatnonzero(owner == i))
            for i in range(n)
        ]
    )
    t2i_rank = np.array(
        [np.flatnonzero(np.argsort(-sim[:, j], kind="stable") == owner[j])[0] for j in range(sim.shape[1])]
    )
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            out[f"{name}/recall@{k}"] = 100.0 * np.mean(rank < k)
    out["rsum"] = sum(out.values())
    return out


def _data(n: int, per_image: int, slots: tuple[int, int] | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    dim = 8
    owner = np.repeat(np.arange(n), per_image)
    if slots is None:
        images = _unit(rng.normal(size=(n, dim)))
        captions = _unit(images[owner] + rng.normal(scale=0.9, size=(len(owner), dim)))
    else:
        images = _unit(rng.normal(size=(n, slots[0], dim)))
        centre = images.mean(axis=1)[owner][:, None, :]
        captions = _unit(centre + rng.normal(scale=0.6, size=(len(owner), slots[1], dim)))
    return images.astype(np.float32), captions.astype(np.float32), owner


def test_single_vectors_match_brute_force() -> None:
    images, captions, owner = _data(40, 5, None)
    got = crossmodal_recall(images, captions, owner)
    want = reference(images.astype(np.float64) @ captions.T.astype(np.float64), owner, (1, 5, 10))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert 0 < got["i2t/recall@1"] < 100 and got["rsum"] == pytest.approx(sum(v for k, v in got.items() if k != "rsum"))


def test_sets_of_different_sizes_match_brute_force_smooth_chamfer() -> None:
    images, captions, owner = _data(30, 3, (4, 2), seed=1)
    want = reference(smooth_chamfer_np(images, captions, 16.0), owner, (1, 5, 10))
    for pairs in (0, 10**9):  # the certified search, and the chunked all-pairs pass
        got = crossmodal_recall(
            images,
            captions,
            owner,
            similarity=SimilaritySpec("smooth_chamfer", alpha=16.0),
            brute_force_pairs=pairs,
        )
        for key in want:
            assert got[key] == pytest.approx(want[key]), (pairs, key)


def test_folds_average_the_blocks_and_perfect_embeddings_score_600() -> None:
    images, captions, owner = _data(50, 2, None, seed=2)
    folds = crossmodal_recall_folds(images, captions, owner, folds=5)
    blocks = [
        crossmodal_recall(
            images[i * 10 : (i + 1) * 10],
            captions[(owner >= i * 10) & (owner < (i + 1) * 10)],
            owner[(owner >= i * 10) & (owner < (i + 1) * 10)] - i * 10,
        )
        for i in range(5)
    ]
    assert folds["rsum"] == pytest.approx(np.mean([b["rsum"] for b in blocks]))
    perfect = crossmodal_recall(images, images[owner], owner)
    assert perfect["rsum"] == pytest.approx(600.0)


def test_bad_inputs_are_one_line() -> None:
    images, captions, owner = _data(5, 2, None)
    with pytest.raises(LangdmlError, match="one image row"):
        crossmodal_recall(images, captions, owner[:-1])
    with pytest.raises(LangdmlError, match="at least one caption"):
        crossmodal_recall(images, captions[:2], np.array([0, 0]))
    with pytest.raises(LangdmlError, match="compare them by smooth_chamfer"):  # K = 2 slots under the cosine
        crossmodal_recall(np.repeat(images[:, None, :], 2, axis=1), captions, owner)


def test_hardest_negative_triplet_by_hand() -> None:
    # Images 0, 1; captions a, b of image 0 and c of image 1.
    sim = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.6, 0.7]])
    positive = torch.tensor([[True, True, False], [False, False, True]])
    # (0,a): hardest caption of 0 is c 0.8 -> 0.2-0.9+0.8 = 0.1; hardest image of a is 1 (0.3) -> 0.2-0.9+0.3 < 0.
    # (0,b): 0.2-0.5+0.8 = 0.5; image side 0.2-0.5+0.6 = 0.3.
    # (1,c): hardest caption of 1 is b 0.6 -> 0.2-0.7+0.6 = 0.1; image side 0.2-0.7+0.8 = 0.3.
    # Means over the 3 positive pairs in each direction: i2t (0.1 + 0.5 + 0.1) / 3, t2i (0 + 0.3 + 0.3) / 3.
    assert hardest_negative_triplet(sim, positive, margin=0.2).item() == pytest.approx(0.7 / 3 + 0.6 / 3)
    all_positive = hardest_negative_triplet(sim, torch.ones(2, 3, dtype=torch.bool))
    assert all_positive.item() == 0.0


def test_hardest_negative_triplet_gradients_reach_only_the_hardest() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.6, 0.7]], requires_grad=True)
    positive = torch.tensor([[True, True, False], [False, False, True]])
    hardest_negative_triplet(sim, positive).backward()
    assert torch.isfinite(sim.grad).all()
    assert sim.grad[1, 0].item() == 0.0  # image 1 with caption a: violates nothing


def test_mmd_exp_kernel_by_hand_and_gradient() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    # k(x,x'): distances 0, 5, 5, 0 -> mean (2 + 2 e^-2.5) / 4; k(y,y) = 1; k(x,y): 0, 5 -> (1 + e^-2.5) / 2.
    e = np.exp(-2.5)
    want = (2 + 2 * e) / 4 + 1 - 2 * (1 + e) / 2
    got = mmd_exp_kernel(x, y)
    assert got.item() == pytest.approx(want)
    got.backward()
    assert torch.isfinite(x.grad).all()  # identical points: no NaN from the square root
    assert mmd_exp_kernel(y, y).item() == pytest.approx(0.0)


def test_vse0_mean_of_violations_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.6, 0.7]])
    positive = torch.tensor([[True, True, False], [False, False, True]])
    # (0,a): captions c -> 0.1; images 1 -> [0.2-0.9+0.3]_+ = 0.  (0,b): c -> 0.5; images 1 -> 0.3.
    # (1,c): captions a -> [0.2-0.7+0.3]_+ = 0, b -> 0.1; images 0 -> 0.3.
    # Means over the (pair, negative) combinations: i2t 4 of them (0.1, 0.5, 0, 0.1), t2i 3 (0, 0.3, 0.3).
    got = hardest_negative_triplet(sim, positive, margin=0.2, hardest=False)
    assert got.item() == pytest.approx(0.7 / 4 + 0.6 / 3)
    rng = torch.Generator().manual_seed(0)
    big = torch.rand(5, 7, generator=rng)
    pos = torch.zeros(5, 7, dtype=torch.bool)
    pos[torch.arange(7) % 5, torch.arange(7)] = True
    i2t, t2i = [], []
    for i in range(5):
        for c in range(7):
            if pos[i, c]:
                i2t += [max(0.0, 0.2 - big[i, c] + big[i, o]) for o in range(7) if not pos[i, o]]
                t2i += [max(0.0, 0.2 - big[i, c] + big[o, c]) for o in range(5) if not pos[o, c]]
    want = float(np.mean(i2t) + np.mean(t2i))
    assert hardest_negative_triplet(big, pos, hardest=False).item() == pytest.approx(want, rel=1e-5)


def _official_triplet(sim: np.ndarray, per_image: int, margin: float, max_violation: bool) -> float:
    """An independent reading of DivE's AsymmetricTripletLoss (loss.py) on a batch of B images whose T
    captions are columns i*T .. i*T+T-1: i2t, for each image and each of its captions, the hinge against the
    other images' captions, max-violation or all, then the mean; t2i, for each caption, against the other
    images, then the mean; their sum."""
    b, n = sim.shape
    i2t, t2i = [], []
    for i in range(b):
        own = range(i * per_image, (i + 1) * per_image)
        others = [c for c in range(n) if c not in own]
        for c in own:
            hinge = [max(0.0, margin + sim[i, o] - sim[i, c]) for o in others]
            i2t += [max(hinge)] if max_violation else hinge
    for c in range(n):
        i = c // per_image
        hinge = [max(0.0, margin + sim[o, c] - sim[i, c]) for o in range(b) if o != i]
        t2i += [max(hinge)] if max_violation else hinge
    return float(np.mean(i2t) + np.mean(t2i))


@pytest.mark.parametrize("per_image", [1, 2, 5])
@pytest.mark.parametrize("hardest", [True, False])
def test_hardest_negative_triplet_equals_the_official_reduction(per_image: int, hardest: bool) -> None:
    rng = np.random.default_rng(per_image)
    sim = rng.uniform(-1, 1, size=(6, 6 * per_image))
    positive = np.repeat(np.eye(6, dtype=bool), per_image, axis=1)
    got = hardest_negative_triplet(torch.tensor(sim), torch.tensor(positive), margin=0.2, hardest=hardest)
    assert got.item() == pytest.approx(_official_triplet(sim, per_image, 0.2, hardest), abs=1e-6)


def test_chunked_all_pairs_top_k_merges_chunks_exactly() -> None:
    from stages.core.evaluation.crossmodal import _set_top_k_both

    images, captions, _ = _data(30, 3, (3, 2), seed=4)
    scores = smooth_chamfer_np(images, captions, 16.0)
    i2t, t2i = _set_top_k_both(images, captions, 5, 6, SimilaritySpec("smooth_chamfer", alpha=16.0), chunk=7)
    np.testing.assert_array_equal(i2t, np.argsort(-scores, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(t2i, np.argsort(-scores.T, axis=1, kind="stable")[:, :6])
