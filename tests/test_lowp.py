"""The low-precision first pass of exact search: certified shortlists give exactly a flat index's ids, and
the precision is chosen by timing (forced here: on an AVX2-only CPU bf16 is never chosen)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.core.evaluation import lowp
from stages.core.evaluation.faiss_lib import load_faiss
from stages.core.evaluation.search import self_search


def _flat(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = load_faiss().IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_certified_low_precision_search_is_a_flat_index(precision: str) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 600)] + 0.8 * rng.normal(size=(600, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    want_s, want_i = _flat(x, x[:200], 15)
    s, i, fallbacks = lowp.certified_topk(x[:200], x, 15, precision, block=64)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(s, want_s, atol=1e-5)
    assert fallbacks == 0
    # a shortlist cap below the certified depth sends queries to the exact float32 search: still exact
    s, i, fallbacks = lowp.certified_topk(x[:200], x, 15, precision, block=64, max_depth=15)
    np.testing.assert_array_equal(i, want_i)
    assert fallbacks > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ties_and_duplicates_keep_a_flat_indexs_order(precision: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(300, 16)).astype(np.float32)  # integer scores: exact in every precision
    x[100:110] = x[5]  # duplicates: exact ties
    want_s, want_i = _flat(x, x, 12)
    s, i, _ = lowp.certified_topk(x, x, 12, precision, block=50)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(self_search(x, 12, precision=precision)[1], want_i)


def test_the_rounding_bound_covers_what_rounding_does() -> None:
    import torch

    rng = np.random.default_rng(2)
    for precision in lowp.LOW_DTYPES:
        q = rng.normal(size=(50, 512)).astype(np.float32) * rng.uniform(0.01, 10)
        x = rng.normal(size=(400, 512)).astype(np.float32)
        exact = q.astype(np.float64) @ x.T.astype(np.float64)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        low = (torch.from_numpy(q).to(dtype) @ torch.from_numpy(x).to(dtype).T).float().numpy()
        c, a = lowp.rounding_bound(precision, 512)
        bound = c * np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1)) + a * (abs(q).max() + abs(x).max())
        assert (np.abs(low - exact) <= bound).all()
        assert np.abs(low - exact).max() > bound.max() / 200  # and is not vacuous


def test_the_precision_is_chosen_by_timing(monkeypatch) -> None:
    lowp.choose_precision.cache_clear()
    assert lowp.choose_precision("cpu", 64, 1.0, 256) in ("fp32", "bf16")
    assert lowp.choose_precision("cpu", 64, 1e9, 256) == "fp32"  # nothing is a billion times faster
    lowp.choose_precision.cache_clear()
    with pytest.raises(ValueError, match="precision must be one of"):
        lowp.certified_topk(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32), 1, "fp8")
