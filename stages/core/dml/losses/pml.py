"""The pytorch-metric-learning losses and miners by name, each comparing through a PML distance."""

from __future__ import annotations

from typing import Any

from stages.core.dml.losses import DMLLoss, dml_loss


def _with(distance: Any) -> dict[str, Any]:
    """The PML keyword that swaps the distance, or nothing (each loss keeps its own default)."""
    return {} if distance is None else {"distance": distance}


@dml_loss("multisimilarity")
def _multisimilarity(
    num_classes: int,
    embed_dim: int,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    distance: Any = None,
) -> DMLLoss:
    from pytorch_metric_learning import losses, miners

    return DMLLoss(
        losses.MultiSimilarityLoss(alpha, beta, base, **_with(distance)),
        miners.MultiSimilarityMiner(epsilon, **_with(distance)),
    )


@dml_loss("margin", inverted=False)
def _margin(
    num_classes: int,
    embed_dim: int,
    margin: float = 0.2,
    beta: float = 1.2,
    nu: float = 0.0,
    beta_lr: float = 5e-4,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    distance: Any = None,
) -> DMLLoss:
    """Per-class learnable beta (as in Roth et al.'s margin loss), trained with ``beta_lr``."""
    from pytorch_metric_learning import losses, miners

    loss = losses.MarginLoss(
        margin=margin, nu=nu, beta=beta, learn_beta=True, num_classes=num_classes, **_with(distance)
    )
    return DMLLoss(loss, miners.DistanceWeightedMiner(cutoff, nonzero_loss_cutoff, **_with(distance)), lr=beta_lr)


@dml_loss("triplet", inverted=False)
def _triplet(num_classes: int, embed_dim: int, margin: float = 0.2, distance: Any = None) -> DMLLoss:
    from pytorch_metric_learning import losses, miners

    return DMLLoss(
        losses.TripletMarginLoss(margin=margin, **_with(distance)),
        miners.TripletMarginMiner(margin, type_of_triplets="semihard", **_with(distance)),
    )


@dml_loss("contrastive", inverted=False)
def _contrastive(
    num_classes: int, embed_dim: int, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: Any = None
) -> DMLLoss:
    from pytorch_metric_learning import losses

    return DMLLoss(losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, **_with(distance)))


@dml_loss("proxy_anchor")
def _proxy_anchor(
    num_classes: int,
    embed_dim: int,
    margin: float = 0.1,
    alpha: float = 32.0,
    lr: float | None = None,
    distance: Any = None,
) -> DMLLoss:
    """Proxies get their own lr (Kim et al. use 100x the backbone's); None falls back to train.head_lr."""
    from pytorch_metric_learning import losses

    return DMLLoss(losses.ProxyAnchorLoss(num_classes, embed_dim, margin=margin, alpha=alpha, **_with(distance)), lr=lr)
