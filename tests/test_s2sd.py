"""S2SD's terms against values computed by hand, and a training run with them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures_training import CLASS_NAMES, TinyImages, tiny_params, train_paths, write_class_embeddings

from stages.core.data.train_images import DecodedImages
from stages.core.dml.objective import train_dml
from stages.core.dml.s2sd import S2SD, pooled_features, similarity_distillation


def test_similarity_distillation_by_hand() -> None:
    # Two rows. Row 0: source (0, 0) -> p = (1/2, 1/2); target (log 3, 0) -> q = (3/4, 1/4).
    # KL(q || p) = 3/4 log(3/2) + 1/4 log(1/2). Row 1: identical -> 0. Sum / B(=2), T = 1.
    source = torch.tensor([[0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    want = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert similarity_distillation(source, target).item() == pytest.approx(want, abs=1e-7)
    # T = 2 scales the logits by 1/2 and the result by T^2 = 4.
    q = torch.softmax(target[0] / 2, 0)
    want2 = 4 * float((q * (q.log() - math.log(0.5))).sum()) / 2
    assert similarity_distillation(source, target, temperature=2.0).item() == pytest.approx(want2, abs=1e-6)
    similarity_distillation(source, target.requires_grad_(True)).backward()
    assert source.grad is not None and target.grad is None  # the target is a teacher: no gradient


def test_pooled_features_average_or_average_plus_max() -> None:
    fmap = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    torch.testing.assert_close(pooled_features(fmap, False), torch.tensor([[1.5, 5.5]]))
    torch.testing.assert_close(pooled_features(fmap, True), torch.tensor([[1.5 + 3, 5.5 + 7]]))


class _Constant(torch.nn.Module):
    """A stand-in base loss whose value is its head's dimension."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return emb.sum() * 0 + self.dim


def test_terms_weighting_and_the_feature_delay() -> None:
    torch.manual_seed(0)
    s2sd = S2SD(4, [6, 8], _Constant, feat_delay=2)
    source = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    labels, fmap = torch.arange(5) % 2, torch.randn(5, 4, 2, 2)
    first = s2sd.terms(source, labels, fmap)
    assert first["s2sd_target"].item() == pytest.approx(7.0)  # the mean over the target heads' losses (6, 8)
    assert first["s2sd_features"].item() == 0.0  # before feat_delay iterations
    s2sd.terms(source, labels, fmap)
    third = s2sd.terms(source, labels, fmap)
    unit = torch.nn.functional.normalize(fmap.mean(dim=(2, 3)), dim=-1)
    want = similarity_distillation(source @ source.T, unit @ unit.T)
    assert third["s2sd_features"].item() == pytest.approx(want.item())


def test_training_with_s2sd_logs_its_terms_and_keeps_the_target_heads_in_the_checkpoint(tmp_path: Path) -> None:
    paths = train_paths(tmp_path)
    write_class_embeddings(paths.class_embeddings)
    s2sd = {"enabled": True, "target_dims": [32, 48], "feat_weight": 5.0, "feat_delay": 0, "pool_aggr": True}
    params = tiny_params(train={"epochs": 2, "s2sd": s2sd, "loss": "multisimilarity_roth"})
    result = train_dml(params, DecodedImages(TinyImages), paths, class_names=CLASS_NAMES)
    row = result.history[-1]
    assert {"loss/s2sd_target", "loss/s2sd_distill", "loss/s2sd_features", "lr/s2sd"} <= set(row)
    assert row["loss/s2sd_features"] > 0
    state = torch.load(paths.checkpoint, weights_only=True)["objective"]
    assert "s2sd.targets.0.0.weight" in state and int(state["s2sd.iterations"]) == 2 * 3  # 3 steps per epoch
