"""DivE in the DML pipeline: smooth-Chamfer, the set head, losses and language targets on sets, set retrieval."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.core.dml.losses import DML_LOSSES, SpecLoss, build_dml_loss
from stages.core.dml.matching import language_matching
from stages.core.evaluation.metrics import retrieval_metrics
from stages.core.evaluation.search import flat_ip_searcher, smooth_chamfer_searcher
from stages.core.evaluation.set_search import SmoothChamferSearch
from stages.core.language.targets import EmbeddingTarget
from stages.core.model.heads import DivEHead, SlotCrossAttention
from stages.core.model.set_losses import slot_diversity
from stages.core.model.similarity import SimilaritySpec, cosine, smooth_chamfer, smooth_chamfer_upper_bound


def _unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def reference_sc(x: torch.Tensor, y: torch.Tensor, alpha: float, centered: bool) -> torch.Tensor:
    """The definition, pair by pair, in float64, with plain exp and log (fine at these alphas)."""
    k1, k2 = x.shape[1], y.shape[1]
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            s = x[i].double() @ y[j].double().T
            e = torch.exp(alpha * s)
            out[i, j] = (torch.log(e.sum(1)).sum() / k1 + torch.log(e.sum(0)).sum() / k2) / (2 * alpha)
    return out - (math.log(k1) + math.log(k2)) / (2 * alpha) if centered else out


@pytest.mark.parametrize(("k1", "k2"), [(1, 1), (1, 3), (4, 2), (3, 5)])
@pytest.mark.parametrize("alpha", [1.0, 16.0, 40.0])
@pytest.mark.parametrize("centered", [False, True])
def test_smooth_chamfer_equals_float64_reference_values_and_gradients(k1, k2, alpha, centered) -> None:
    x64, y64 = _unit(5, k1, 8, seed=1), _unit(6, k2, 8, seed=2)
    x64.requires_grad_(True)
    y64.requires_grad_(True)
    ref = reference_sc(x64, y64, alpha, centered)
    gx_ref, gy_ref = torch.autograd.grad(ref.sum(), (x64, y64))
    x32 = x64.detach().float().requires_grad_(True)
    y32 = y64.detach().float().requires_grad_(True)
    got = smooth_chamfer(x32, y32, alpha=alpha, centered=centered)
    gx, gy = torch.autograd.grad(got.sum(), (x32, y32))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(gx.double(), gx_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gy.double(), gy_ref, atol=2e-5, rtol=1e-5)


def test_single_slot_is_exactly_the_cosine_and_bounds_hold() -> None:
    a, b = _unit(7, 16, seed=3, dtype=torch.float32), _unit(9, 16, seed=4, dtype=torch.float32)
    assert torch.equal(smooth_chamfer(a, b), a @ b.T)
    assert torch.equal(smooth_chamfer(a[:, None], b[:, None], alpha=3.0, centered=True), a @ b.T)
    x, y = _unit(6, 4, 16, seed=5), _unit(8, 3, 16, seed=6)
    s = torch.einsum("ikd,jld->ijkl", x, y)
    chamfer = (s.amax(3).mean(2) + s.amax(2).mean(2)) / 2
    mean_cos = s.mean(dim=(2, 3))
    alpha = 16.0
    sc = smooth_chamfer(x, y, alpha=alpha)
    assert (sc >= chamfer - 1e-12).all() and (sc <= chamfer + (math.log(4) + math.log(3)) / (2 * alpha) + 1e-12).all()
    centred = smooth_chamfer(x, y, alpha=alpha, centered=True)
    assert (centred >= mean_cos - 1e-12).all() and (centred <= chamfer + 1e-12).all()


def test_large_alpha_stays_finite_and_chunking_changes_nothing() -> None:
    x, y = _unit(10, 4, 8, seed=7, dtype=torch.float32), _unit(12, 4, 8, seed=8, dtype=torch.float32)
    big = smooth_chamfer(x, y, alpha=500.0)
    assert torch.isfinite(big).all()
    assert not torch.isfinite(torch.exp(500.0 * (x[0] @ y[0].T))).all()  # what exp-then-log would do
    torch.testing.assert_close(smooth_chamfer(x, y, budget=16), smooth_chamfer(x, y), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert smooth_chamfer(x.bfloat16(), y.bfloat16()).dtype == torch.float32


def test_upper_bound_covers_every_set_below_the_thresholds() -> None:
    gen = torch.Generator().manual_seed(9)
    tau = torch.rand(50, 4, generator=gen, dtype=torch.float64) * 2 - 1
    for alpha in (1.0, 16.0):
        for centered in (False, True):
            bound = smooth_chamfer_upper_bound(tau, 3, alpha=alpha, centered=centered)
            s = tau[:, :, None] - torch.rand(50, 4, 3, generator=gen, dtype=torch.float64)  # s_il <= tau_i
            e = alpha * s
            sc = (torch.logsumexp(e, 2).mean(1) + torch.logsumexp(e, 1).mean(1)) / (2 * alpha)
            sc = sc - (math.log(4) + math.log(3)) / (2 * alpha) if centered else sc
            assert (sc <= bound + 1e-12).all()
            at_tau = tau[:, :, None].expand(-1, -1, 3)  # the bound is tight when every s_il = tau_i
            e = alpha * at_tau
            tight = (torch.logsumexp(e, 2).mean(1) + torch.logsumexp(e, 1).mean(1)) / (2 * alpha)
            tight = tight - (math.log(4) + math.log(3)) / (2 * alpha) if centered else tight
            torch.testing.assert_close(tight, bound)


# --- the set head --------------------------------------------------------------------------------------


def test_masked_inputs_get_exactly_zero_attention() -> None:
    """The official code masks before the softmax over slots, which leaves each padded input 1/K of every
    slot; here a padded input has no weight at all, and the real inputs of each slot sum to one."""
    torch.manual_seed(0)
    attn_module = SlotCrossAttention(16, heads=4)
    slots, inputs = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[False, False, True, False, True], [False, False, False, False, False]])
    _, attn = attn_module(slots, inputs, mask)
    assert torch.equal(attn[0][:, mask[0]], torch.zeros(3, 2))
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    head = DivEHead(8, 16, slots=3, depth=2, heads=4).eval()
    tokens = torch.randn(2, 5, 8)
    out = head.forward_tokens(tokens, mask)
    assert torch.equal(out["attention"][0][:, mask[0]], torch.zeros(3, 2))
    # padded tokens change nothing: the same set as for the tokens alone
    alone = head.forward_tokens(tokens[:1, ~mask[0]])
    torch.testing.assert_close(out["embeddings"][:1], alone["embeddings"], atol=1e-5, rtol=1e-5)


def test_dive_head_outputs_unit_slots_residuals_and_maps() -> None:
    torch.manual_seed(0)
    head = DivEHead(12, 16, slots=4, depth=3, heads=2)
    fmap = torch.randn(3, 12, 2, 3)
    out = head(fmap)
    assert out["embeddings"].shape == (3, 4, 16) and out["residual"].shape == (3, 4, 16)
    torch.testing.assert_close(out["embeddings"].norm(dim=-1), torch.ones(3, 4))
    maps, titles = head.maps(fmap)
    assert maps.shape == (3, 4, 2, 3) and titles == ["slot 1", "slot 2", "slot 3", "slot 4"]
    n_blocks = sum(1 for m in head.modules() if m.__class__.__name__ == "SlotBlock")
    assert n_blocks == 1  # weight-tied: one block applied `depth` times
    out["embeddings"].sum().backward()
    assert head.queries.grad is not None and torch.isfinite(head.queries.grad).all()


def test_slot_diversity_by_hand() -> None:
    same = torch.ones(1, 2, 3)
    assert slot_diversity(same).item() == pytest.approx(1.0)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert slot_diversity(opposite).item() == pytest.approx(math.exp(-8.0))  # ||z_k - z_l||^2 = 4
    orthogonal = torch.eye(3).unsqueeze(0)
    assert slot_diversity(orthogonal).item() == pytest.approx(math.exp(-4.0))
    assert slot_diversity(torch.randn(2, 1, 5)).item() == 0.0


# --- losses and language targets on sets --------------------------------------------------------------


CHAMFER = SimilaritySpec("smooth_chamfer", alpha=16.0)


@pytest.mark.parametrize("name", DML_LOSSES.names())
def test_every_loss_runs_on_sets_and_single_slot_sets_match_the_vector_loss(name: str) -> None:
    emb = _unit(16, 8, seed=10, dtype=torch.float32)
    labels = torch.arange(16) % 4
    torch.manual_seed(0)
    as_vectors = build_dml_loss(name, 4, 8)
    torch.manual_seed(0)
    as_sets = build_dml_loss(name, 4, 8, similarity=CHAMFER, slots=1)  # the same proxies: one RNG draw
    torch.manual_seed(1)  # the distance-weighted miner samples
    expected = as_vectors(emb, labels)
    torch.manual_seed(1)
    torch.testing.assert_close(as_sets(emb[:, None], labels), expected, atol=1e-4, rtol=1e-4)
    sets = _unit(16, 4, 8, seed=11, dtype=torch.float32).requires_grad_(True)
    loss = build_dml_loss(name, 4, 8, similarity=CHAMFER, slots=4)(sets, labels)
    loss.backward()
    assert torch.isfinite(loss) and sets.grad is not None and torch.isfinite(sets.grad).all()
    if not isinstance(as_vectors.loss, SpecLoss):  # a SpecLoss compares by its spec: the cosine of slot means
        with pytest.raises(ValueError, match="2D tensor"):  # PML refuses unflattened sets: none flattened silently
            as_vectors(sets, labels)


def test_language_matching_on_sets_and_plg_as_sets() -> None:
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    lang = torch.rand(6, 6, generator=torch.Generator().manual_seed(1))
    vectors = _unit(6, 8, seed=12, dtype=torch.float32)
    centred = SimilaritySpec("smooth_chamfer", alpha=16.0, centered=True)
    torch.testing.assert_close(
        language_matching(vectors[:, None], labels, lang, similarity=centred), language_matching(vectors, labels, lang)
    )
    sets = _unit(6, 4, 8, seed=13, dtype=torch.float32)
    torch.testing.assert_close(
        cosine(sets, sets), F.normalize(sets.mean(1), dim=-1) @ F.normalize(sets.mean(1), dim=-1).T
    )
    assert torch.isfinite(language_matching(sets, labels, lang, similarity=centred))
    # PLG: k names per class; as a set every name meets every name, rank-wise only the same rank
    names = _unit(3, 5, 8, seed=14, dtype=torch.float32)  # k=3 ranks x C=5 classes
    dense = torch.tensor([0, 1, 4])
    rankwise = EmbeddingTarget(names)(dense)
    as_set = EmbeddingTarget(names, centred)(dense)
    expected = smooth_chamfer(names[:, dense].transpose(0, 1), names[:, dense].transpose(0, 1), centered=True)
    torch.testing.assert_close(as_set, expected)
    assert not torch.allclose(as_set, rankwise)
    one_name = names[:1]
    torch.testing.assert_close(EmbeddingTarget(one_name, centred)(dense), EmbeddingTarget(one_name)(dense))


# --- set retrieval -------------------------------------------------------------------------------------


def _clustered_sets(n: int, k: int, dim: int, n_classes: int, seed: int, noise: float) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, k, dim))
    y = rng.integers(0, n_classes, n)
    x = centres[y] + noise * rng.standard_normal((n, k, dim))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32), y


def _brute_force(q: np.ndarray, yq: np.ndarray, g: np.ndarray | None, yg: np.ndarray | None, ks, alpha) -> dict:
    loo = g is None
    g, yg = (q, yq) if loo else (g, yg)
    sim = smooth_chamfer(torch.from_numpy(q).double(), torch.from_numpy(g).double(), alpha=alpha).numpy()
    out: dict[str, list[float]] = {"map@r": [], **{f"recall@{k}": [] for k in ks}}
    for i in range(len(q)):
        others = np.array([j for j in range(len(g)) if not (loo and j == i)])
        rel = yg[others[np.argsort(-sim[i, others], kind="stable")]] == yq[i]
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(float(rel[:k].any()))
        out["map@r"].append(float((np.cumsum(rel[:r]) / np.arange(1, r + 1) * rel[:r]).sum() / r))
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize(("shortlist", "alpha"), [(32, 16.0), (2, 16.0), (8, 4.0)])
def test_set_retrieval_equals_brute_force(shortlist: int, alpha: float) -> None:
    x, y = _clustered_sets(240, 3, 12, 12, seed=15, noise=1.3)
    ks = (1, 2, 4, 8)
    options = {"similarity": SimilaritySpec("smooth_chamfer", alpha=alpha)}
    options["searcher"] = partial(smooth_chamfer_searcher, alpha=alpha, shortlist=shortlist)
    m = retrieval_metrics(x, query_labels=y, ks=ks, nmi=False, **options)
    ref = _brute_force(x, y, None, None, ks, alpha)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    q, g = x[:80], x[80:]
    m = retrieval_metrics(
        q,
        g,
        query_labels=y[:80],
        gallery_labels=y[80:],
        ks=ks,
        nmi=False,
        **options,
    )
    ref = _brute_force(q, y[:80], g, y[80:], ks, alpha)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_set_search_certifies_most_queries_at_the_first_shortlist_and_returns_exact_scores() -> None:
    x, _ = _clustered_sets(300, 4, 16, 20, seed=16, noise=0.8)
    search = SmoothChamferSearch(x, flat_ip_searcher, alpha=16.0, shortlist=64, exhaustive_fraction=1.0)
    scores, ids = search(x[:50], 10)
    brute = smooth_chamfer(torch.from_numpy(x[:50]).double(), torch.from_numpy(x).double()).numpy()
    for i in range(50):
        order = np.lexsort((np.arange(300), -brute[i]))[:10]
        np.testing.assert_array_equal(ids[i], order)
        np.testing.assert_allclose(scores[i], brute[i, order], atol=1e-12)
    assert search.stats["queries"] == 50 and search.stats["certified_first"] >= 40
    fallback = SmoothChamferSearch(x, flat_ip_searcher, alpha=16.0, shortlist=64, exhaustive_fraction=0.0)
    again, again_ids = fallback(x[:50], 10)
    np.testing.assert_array_equal(again_ids, ids)
    np.testing.assert_allclose(again, scores, atol=1e-12)
    assert fallback.stats["brute_force"] == 50


def test_dive_slots_start_distinct() -> None:
    """Unit-variance queries (as the official code): queries scaled to norm ~1 are swamped by the first
    attention update, and the slots start nearly identical (cosine 0.98) and stay so after training."""
    torch.manual_seed(0)
    out = DivEHead(320, 512)(torch.randn(8, 320, 2, 2))
    z = F.normalize(out["residual"], dim=-1)
    off_diagonal = (z @ z.transpose(1, 2))[:, ~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.3
    assert slot_diversity(out["residual"]) < 0.2
