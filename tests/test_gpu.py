"""Checks that need a CUDA GPU (and faiss-gpu: `make repro FAISS=gpu`); skipped on machines without them."""

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
    from stages.core.evaluation import search
    from stages.core.evaluation.metrics import retrieval_metrics

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64))
    y = rng.integers(0, 50, 5000)
    x = (centres[y] + rng.standard_normal((5000, 64))).astype(np.float32)
    on_gpu = retrieval_metrics(x, query_labels=y, nmi=False)
    cpu_count = search.faiss_gpu_count
    try:
        search.faiss_gpu_count = lambda: 0
        on_cpu = retrieval_metrics(x, query_labels=y, nmi=False)
    finally:
        search.faiss_gpu_count = cpu_count
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-6), key


@needs_gpu
def test_set_search_on_the_gpu_index_is_still_exact() -> None:
    from stages.core.evaluation.search import flat_ip_searcher
    from stages.core.evaluation.set_search import SmoothChamferSearch
    from stages.core.model.similarity import smooth_chamfer

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 4, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    _, ids = SmoothChamferSearch(x, flat_ip_searcher, exhaustive_fraction=1.0)(x[:20], 5)
    brute = smooth_chamfer(torch.tensor(x[:20], dtype=torch.float64), torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_augmentation_on_cuda_matches_the_cpu() -> None:
    from stages.core.config import AugmentParams
    from stages.core.data.augment import augment_batch, draw_augmentation

    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8))
    aug = AugmentParams(flip=True, min_crop_scale=0.2, color_jitter=0.4)
    theta, colour = (torch.from_numpy(a) for a in draw_augmentation(range(6), np.full((6, 2), 40), aug, 32))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    on_cpu = augment_batch(images, theta, colour, 32, mean, std)
    on_gpu = augment_batch(images.cuda(), theta.cuda(), colour.cuda(), 32, mean, std)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_imagetext_set_recall_on_cuda_matches_the_cpu() -> None:
    from stages.core.evaluation.crossmodal import crossmodal_recall
    from stages.core.model.similarity import SimilaritySpec

    rng = np.random.default_rng(3)
    images = rng.standard_normal((300, 4, 16)).astype(np.float32)
    owner = np.repeat(np.arange(300), 2)
    captions = images[owner] + 2.5 * rng.standard_normal((600, 4, 16)).astype(np.float32)  # recall@1 ~ 20-30%
    kwargs = {"similarity": SimilaritySpec("smooth_chamfer", alpha=16.0)}
    on_cpu = crossmodal_recall(images, captions, owner, device="cpu", **kwargs)
    on_gpu = crossmodal_recall(images, captions, owner, device="cuda", **kwargs)
    assert on_gpu == pytest.approx(on_cpu, abs=0.5)  # a near-tie may rank differently in float32 on another device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_certified_fp16_search_on_cuda_is_a_flat_index() -> None:
    from stages.core.evaluation import lowp
    from stages.core.evaluation.faiss_lib import heap_topk

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 128))
    x = (centres[rng.integers(0, 100, 20000)] + 2.0 * rng.standard_normal((20000, 128))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids, _ = lowp.certified_topk(x[:2000], x, 20, "fp16", device="cuda")
    full = x[:2000] @ x.T
    want_s, want_i = heap_topk(full, np.broadcast_to(np.arange(len(x)), full.shape), 20)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    # ids differ only where two scores are equal up to the GPU's and NumPy's last digits
    rows, cols = np.nonzero(ids != want_i)
    np.testing.assert_allclose(full[rows, ids[rows, cols]], want_s[rows, cols], atol=1e-5)
    assert (ids == want_i).mean() > 0.999
    assert lowp.choose_precision("cuda", 128, 1.0) in ("fp32", "bf16", "fp16")
