"""Checks that need a CUDA GPU and faiss-gpu (`make repro FAISS=gpu`); skipped on machines without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0,
    reason="needs a CUDA GPU and faiss-gpu",
)


@needs_gpu
def test_gpu_index_gives_the_cpu_metrics() -> None:
    from stages.core import metrics

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64))
    y = rng.integers(0, 50, 5000)
    x = (centres[y] + rng.standard_normal((5000, 64))).astype(np.float32)
    on_gpu = metrics.retrieval_metrics(x, query_labels=y, nmi=False)
    cpu_count = metrics._faiss_gpu_count
    try:
        metrics._faiss_gpu_count = lambda: 0
        on_cpu = metrics.retrieval_metrics(x, query_labels=y, nmi=False)
    finally:
        metrics._faiss_gpu_count = cpu_count
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-6), key


@needs_gpu
def test_set_search_on_the_gpu_index_is_still_exact() -> None:
    from stages.core.set_search import SmoothChamferSearch
    from stages.core.similarity import smooth_chamfer

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 4, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    _, ids = SmoothChamferSearch(x, exhaustive_fraction=1.0)(x[:20], 5)
    brute = smooth_chamfer(torch.tensor(x[:20], dtype=torch.float64), torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
