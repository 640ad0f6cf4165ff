"""Language matching against hand-computed values and a float64 NumPy reference; DML losses by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from stages.core.config import load_params
from stages.core.dml.losses import DML_LOSSES, build_dml_loss
from stages.core.dml.matching import language_matching
from stages.core.errors import LangdmlError
from stages.core.model.similarity import SimilaritySpec
from stages.core.registry import RegistryError

torch.set_num_threads(1)


def reference(emb, labels, lang, gamma, t, direction, t_q=None, exclude=False):
    """Independent float64 NumPy version of the masked, temperature-scaled KL; ``exclude`` computes
    each row's KL over its other-class entries only, row by row."""
    emb, lang = np.asarray(emb, np.float64), np.asarray(lang, np.float64)
    same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
    t_q = t if t_q is None else t_q
    total = 0.0
    for i in range(len(emb)):
        keep = ~same[i] if exclude else np.ones(len(emb), bool)
        if not keep.any():
            continue
        s_img = np.where(same[i], 1 + gamma, emb[i] @ emb.T)[keep]
        s_lang = np.where(same[i], 1 + gamma, lang[i] + gamma)[keep]
        log_p, log_q = log_softmax(s_img / t), log_softmax(s_lang / t_q)
        a, b = (log_p, log_q) if direction == "backward" else (log_q, log_p)
        total += float((np.exp(a) * (a - b)).sum())
    return t**2 * total / len(emb)


# Three samples, three classes: e0 = (1, 0), e1 = (0, 1), e2 = (-1, 0).
HAND_EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
HAND_LABELS = torch.tensor([0, 1, 2])
HAND_LANG = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])


def test_hand_computed_three_samples() -> None:
    # gamma = 1: S_img_x = [[2, 0, -1], [0, 2, 0], [-1, 0, 2]]  (diagonal -> 1 + gamma = 2)
    #            S_lang_x = [[2, 1.5, 1], [1.5, 2, 1.5], [1, 1.5, 2]]  (lang + 1, diagonal -> 2)
    # Row 0: P = softmax(2, 0, -1) = (0.843795, 0.114195, 0.042010),
    #        Q = softmax(2, 1.5, 1) = (0.506480, 0.307196, 0.186324).
    # Row 1: P = (0.106507, 0.786986, 0.106507), Q = (0.274069, 0.451863, 0.274069); row 2 mirrors row 0.
    # backward = (KL(P0||Q0) + KL(P1||Q1) + KL(P2||Q2)) / 3 = 0.248511; forward uses KL(Q||P) = 0.304470.
    back = language_matching(HAND_EMB, HAND_LABELS, HAND_LANG)
    fwd = language_matching(HAND_EMB, HAND_LABELS, HAND_LANG, direction="forward")
    assert back.item() == pytest.approx(0.248511, abs=1e-6)
    assert fwd.item() == pytest.approx(0.304470, abs=1e-6)
    # T = 2: softmax of S/2 on both sides, times T^2 = 4: 0.336436.
    t2 = language_matching(HAND_EMB, HAND_LABELS, HAND_LANG, temperature=2.0)
    assert t2.item() == pytest.approx(0.336436, abs=1e-6)


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize(("gamma", "t"), [(0.0, 1.0), (1.0, 0.5), (2.5, 3.0)])
def test_matches_float64_reference(direction: str, gamma: float, t: float) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=10)
    lang = rng.uniform(-1, 1, size=(10, 10))
    got = language_matching(
        torch.tensor(emb, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor(lang, dtype=torch.float32),
        gamma=gamma,
        temperature=t,
        direction=direction,
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference(emb, labels, lang, gamma, t, direction), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize(("t_q", "same_class"), [(0.1, "fill"), (None, "exclude"), (0.2, "exclude")])
def test_sharpened_and_excluding_targets_match_the_reference(
    direction: str, t_q: float | None, same_class: str
) -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(9, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4])
    lang = rng.uniform(-1, 1, size=(9, 9))
    got = language_matching(
        torch.tensor(emb),
        torch.tensor(labels),
        torch.tensor(lang),
        gamma=0.5,
        temperature=1.0,
        target_temperature=t_q,
        same_class=same_class,
        direction=direction,
    )
    want = reference(emb, labels, lang, 0.5, 1.0, direction, t_q=t_q, exclude=same_class == "exclude")
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_exclude_has_finite_gradients_and_ignores_rows_of_one_class() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    lang = torch.rand(6, 6, generator=g, dtype=torch.float64)

    def f(e: torch.Tensor) -> torch.Tensor:
        return language_matching(e, labels, lang, target_temperature=0.3, same_class="exclude")

    assert torch.autograd.gradcheck(f, (emb,))
    one_class = language_matching(emb, torch.zeros(6, dtype=torch.long), lang, same_class="exclude")
    assert one_class.item() == 0.0


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_gradcheck_float64(direction: str) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    lang = torch.rand(6, 6, generator=g, dtype=torch.float64)

    def f(e: torch.Tensor) -> torch.Tensor:
        return language_matching(e, labels, lang, gamma=0.7, temperature=1.5, direction=direction)

    assert f(emb).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (emb,))


def test_language_side_has_no_gradient_and_same_class_entries_are_masked() -> None:
    emb = torch.nn.functional.normalize(torch.randn(5, 3), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 2, 2])
    lang = torch.rand(5, 5, requires_grad=True)
    loss = language_matching(emb, labels, lang)
    loss.backward()
    assert lang.grad is None
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # Same-class language entries are overwritten by 1 + gamma: changing them changes nothing.
    same = labels[:, None] == labels[None, :]
    other = lang.detach().masked_fill(same, -7.0)
    assert language_matching(emb, labels, other).item() == pytest.approx(loss.item(), abs=1e-7)


def test_zero_when_image_similarities_match_the_target() -> None:
    gamma = 0.8
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    lang = (emb @ emb.T).detach() - gamma  # then lang + gamma == S_img off the same-class mask
    for direction in ("backward", "forward"):
        loss = language_matching(emb, labels, lang, gamma=gamma, direction=direction)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        (grad,) = torch.autograd.grad(loss, emb)
        assert grad.abs().max().item() < 1e-5


def test_gamma_and_temperature_change_the_loss_as_the_formula_says() -> None:
    emb, labels, lang = HAND_EMB, HAND_LABELS, HAND_LANG
    values = {
        (g, t): language_matching(emb, labels, lang, gamma=g, temperature=t).item()
        for g in (0.0, 1.0, 4.0)
        for t in (0.5, 1.0, 2.0)
    }
    for (g, t), v in values.items():
        assert v == pytest.approx(reference(emb.numpy(), labels.numpy(), lang.numpy(), g, t, "backward"), rel=1e-5)
    assert len({round(v, 6) for v in values.values()}) == len(values)  # each knob matters
    # A larger gamma makes the own-class entry dominate P but not Q's spread: the KL grows here.
    assert values[(4.0, 1.0)] > values[(1.0, 1.0)] > values[(0.0, 1.0)]


def test_float32_under_autocast() -> None:
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    lang = torch.rand(6, 6)
    ref = language_matching(emb, labels, lang)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = language_matching(emb.bfloat16(), labels, lang.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


def test_bad_direction_and_similarity_registry() -> None:
    with pytest.raises(ValueError, match="direction"):
        language_matching(HAND_EMB, HAND_LABELS, HAND_LANG, direction="sideways")
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(SimilaritySpec("cosine")(a, b), a @ b.T)
    with pytest.raises(RegistryError, match="cosine, smooth_chamfer"):
        SimilaritySpec("nope")(a, b)


DEFAULT_LOSS_KWARGS = load_params(Path(__file__).resolve().parents[1] / "params.yaml").losses


@pytest.mark.parametrize("name", DML_LOSSES.names())
def test_each_dml_loss_builds_from_params_yaml_and_gives_finite_loss_and_gradient(name: str) -> None:
    torch.manual_seed(0)
    loss_fn = build_dml_loss(name, num_classes=4, embed_dim=8, kwargs=DEFAULT_LOSS_KWARGS.get(name))
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(4)
    loss = loss_fn(emb, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    for group in loss_fn.param_groups():
        assert all(torch.isfinite(p.grad).all() for p in group["params"] if p.grad is not None)


def test_loss_parameters_get_their_own_group_and_lr() -> None:
    pa = build_dml_loss("proxy_anchor", 5, 8, {"lr": 0.02})
    (group,) = pa.param_groups()
    assert group["lr"] == 0.02 and group["params"][0].shape == (5, 8)
    (margin_group,) = build_dml_loss("margin", 5, 8, {"beta_lr": 0.001}).param_groups()
    assert margin_group["lr"] == 0.001 and margin_group["params"][0].numel() == 5  # one beta per class
    assert build_dml_loss("multisimilarity", 5, 8).param_groups() == []


def test_wrong_loss_kwarg_and_unknown_loss_are_one_line_errors() -> None:
    with pytest.raises(LangdmlError, match=r"losses\.triplet\.margn: unknown keyword; allowed keys: margin$") as err:
        build_dml_loss("triplet", 4, 8, {"margn": 0.1})
    assert "\n" not in str(err.value)
    with pytest.raises(RegistryError, match="multisimilarity"):
        build_dml_loss("arcface-typo", 4, 8)


def _pml_losses() -> list[str]:
    """The registered losses built on pytorch-metric-learning (the others compare by the head's spec)."""

    return [n for n in DML_LOSSES.names() if not DML_LOSSES.get(n).by_spec]


@pytest.mark.parametrize("name", _pml_losses())
def test_every_loss_and_miner_take_a_pml_distance(name: str) -> None:
    """The plug for a set similarity: the distance reaches the loss and its miner, and the loss still trains."""
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

    distance = LpDistance(normalize_embeddings=True) if name == "margin" else CosineSimilarity()
    dml = build_dml_loss(name, 4, 8, distance=distance)
    assert dml.loss.distance is distance
    if dml.miner is not None:
        assert dml.miner.distance is distance
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    emb.requires_grad_(True)
    loss = dml(emb, torch.arange(16) % 4)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad is not None


def _official_multisimilarity(emb: np.ndarray, labels: np.ndarray, a=2.0, b=40.0, margin=0.1, thresh=0.5) -> float:
    """An independent reference: the official criteria/multisimilarity.py read literally (dim = 0: the
    bounds and log-sum-exps run down each column j), in float64 loops."""
    s = emb.astype(np.float64) @ emb.astype(np.float64).T
    n = len(labels)
    pos_s, neg_s = [], []
    for j in range(n):
        pos = [i for i in range(n) if labels[i] == labels[j] and i != j]
        neg = [i for i in range(n) if labels[i] != labels[j]]
        pos_bound = min(s[i, j] for i in pos) if pos else np.finfo(np.float64).max
        neg_bound = max(s[i, j] for i in neg) if neg else np.finfo(np.float64).min
        mined_pos = [i for i in pos if s[i, j] - margin < neg_bound]
        mined_neg = [i for i in neg if s[i, j] + margin > pos_bound]
        pos_s.append(np.log1p(sum(np.exp(-a * (s[i, j] - thresh)) for i in mined_pos)))
        neg_s.append(np.log1p(sum(np.exp(b * (s[i, j] - thresh)) for i in mined_neg)))
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    return softplus(np.mean(pos_s)) / a + softplus(np.mean(neg_s)) / b


@pytest.mark.parametrize(
    ("n", "classes", "dim", "seed"), [(12, 3, 8, 0), (30, 6, 16, 1), (40, 20, 4, 2), (16, 2, 32, 3)]
)
def test_multisimilarity_roth_equals_the_official_formula(n: int, classes: int, dim: int, seed: int) -> None:
    from stages.core.dml.losses.roth import multisimilarity_roth

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(n) % classes)
    ours = multisimilarity_roth(torch.tensor(emb, dtype=torch.float64), torch.tensor(labels))
    assert ours.item() == pytest.approx(_official_multisimilarity(emb, labels), abs=1e-5)
    loss = build_dml_loss("multisimilarity_roth", classes, dim, {"alpha": 2.0, "beta": 40.0})
    assert loss(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels)).item() == pytest.approx(
        ours.item(), abs=1e-5
    )
    # Not pytorch-metric-learning's form: the softplus of batch means is another number.
    pml = build_dml_loss("multisimilarity", classes, dim, {"alpha": 2.0, "beta": 40.0, "base": 0.5})
    assert abs(pml(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels)).item() - ours.item()) > 1e-3


def test_multisimilarity_roth_on_sets_by_the_heads_similarity() -> None:
    from stages.core.model.similarity import SimilaritySpec

    rng = np.random.default_rng(5)
    vectors = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((12, 8)), dtype=torch.float32), dim=-1)
    labels = torch.arange(12) % 4
    chamfer = SimilaritySpec("smooth_chamfer", alpha=16.0)
    on_sets = build_dml_loss("multisimilarity_roth", 4, 8, similarity=chamfer, slots=1)
    torch.testing.assert_close(
        on_sets(vectors[:, None], labels), build_dml_loss("multisimilarity_roth", 4, 8)(vectors, labels)
    )
    sets = torch.nn.functional.normalize(torch.randn(12, 3, 8), dim=-1).requires_grad_(True)
    loss = build_dml_loss("multisimilarity_roth", 4, 8, similarity=chamfer, slots=3)(sets, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sets.grad).all()
