"""Roth et al.'s own multisimilarity (``losses.multisimilarity_roth``), compared by the head's spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.core.dml.losses import DMLLoss, SpecLoss, dml_loss
from stages.core.model.similarity import COSINE, SimilaritySpec


def multisimilarity_roth(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 40.0,
    margin: float = 0.1,
    threshold: float = 0.5,
    similarity: SimilaritySpec = COSINE,
) -> torch.Tensor:
    """Multisimilarity in the form of Roth et al.'s official code (ExplainableML/LanguageGuidance_for_DML,
    ``criteria/multisimilarity.py``), which the paper's omegas were tuned with:

        L = softplus(mean_a P_a) / alpha + softplus(mean_a N_a) / beta,
        P_a = log(1 + sum_{p in P*(a)} exp(-alpha (s_ap - lambda))),
        N_a = log(1 + sum_{n in N*(a)} exp(beta (s_an - lambda)))

    with the official mining: P*(a) = positives (self excluded) with s_ap - margin < max_n s_an, N*(a) =
    negatives with s_an + margin > min_p s_ap (an anchor with none adds 0). Reduction: the mean over the B
    anchors INSIDE the softplus (pytorch-metric-learning's ``MultiSimilarityLoss`` averages per-anchor
    losses instead). S is ``similarity`` (the head's; the cosine, as the official ``smat``, for a linear
    head)."""
    sims = similarity(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=sims.device)
    neg = ~same
    hardest_pos = sims.masked_fill(~pos, torch.inf).amin(dim=1, keepdim=True)
    hardest_neg = sims.masked_fill(~neg, -torch.inf).amax(dim=1, keepdim=True)
    pos_terms = _log1p_sum_exp(-alpha * (sims - threshold), pos & (sims - margin < hardest_neg))
    neg_terms = _log1p_sum_exp(beta * (sims - threshold), neg & (sims + margin > hardest_pos))
    return F.softplus(pos_terms.mean()) / abs(alpha) + F.softplus(neg_terms.mean()) / abs(beta)


class MultiSimilarityRoth(SpecLoss):
    """:func:`multisimilarity_roth` with its parameters (``losses.multisimilarity_roth``)."""

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 40.0,
        margin: float = 0.1,
        threshold: float = 0.5,
        similarity: SimilaritySpec = COSINE,
    ) -> None:
        super().__init__(similarity)
        self.alpha, self.beta, self.margin, self.threshold = alpha, beta, margin, threshold

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        options = {"alpha": self.alpha, "beta": self.beta, "margin": self.margin, "threshold": self.threshold}
        return multisimilarity_roth(embeddings, labels, similarity=self.similarity, **options)


def _log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: log(1 + sum over the masked entries of exp(value)), stably (0 for a row with none)."""
    masked = values.masked_fill(~mask, -torch.inf)
    return torch.logsumexp(torch.cat([masked, masked.new_zeros(len(masked), 1)], dim=1), dim=1)


@dml_loss("multisimilarity_roth", by_spec=True)
def _multisimilarity_roth(
    num_classes: int,
    embed_dim: int,
    alpha: float = 2.0,
    beta: float = 40.0,
    margin: float = 0.1,
    threshold: float = 0.5,
    similarity: SimilaritySpec = COSINE,
) -> DMLLoss:
    """Roth et al.'s own multisimilarity (official defaults: alpha 2, beta 40, margin 0.1, threshold 0.5)."""
    return DMLLoss(MultiSimilarityRoth(alpha, beta, margin, threshold, similarity))
