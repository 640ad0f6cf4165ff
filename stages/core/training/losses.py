"""The base DML losses by name (``train.loss``), from pytorch-metric-learning.

Each registered factory returns a :class:`DMLLoss` (loss + miner) that also says which of its parameters
need their own optimiser group (margin's beta, proxy-anchor's proxies). A factory takes an optional PML
``distance``; for a set head, :func:`set_distance` turns the head's :class:`SimilaritySpec` into one, so a
set similarity plugs in under every loss and miner unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.registry import Registry


class _SetDistanceMixin:
    """Rows are flattened sets (B x K*D); each is reshaped to K unit slots and compared by the head's spec."""

    slots: int
    spec: SimilaritySpec

    def _sets(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.reshape(x.shape[0], self.slots, -1), dim=-1)

    def _similarity(self, query_emb: torch.Tensor, ref_emb: torch.Tensor, centered: bool) -> torch.Tensor:
        return replace(self.spec, centered=centered)(self._sets(query_emb), self._sets(ref_emb))

    def _paired(self, query_emb: torch.Tensor, ref_emb: torch.Tensor, centered: bool) -> torch.Tensor:
        """The similarity of row i with row i (what PML's ``pairwise_distance`` asks)."""
        return replace(self.spec, centered=centered).paired(self._sets(query_emb), self._sets(ref_emb))


def set_distance(like: Any, slots: int, similarity: SimilaritySpec) -> Any:
    """A pytorch-metric-learning distance over flattened sets in the form of ``like`` (the loss's own
    default): the set similarity where the loss compares by similarity, an L2-like distance
    sqrt(2 - 2 S_centred) where it compares by distance (margin loss and its distance-weighted miner)."""
    from pytorch_metric_learning.distances import BaseDistance, LpDistance

    class SetSimilarity(_SetDistanceMixin, BaseDistance):
        def __init__(self) -> None:
            super().__init__(normalize_embeddings=False, is_inverted=True)
            self.slots, self.spec = slots, similarity

        def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return self._similarity(query_emb, ref_emb, centered=False)

        def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return self._paired(query_emb, ref_emb, centered=False)

    class SetL2(_SetDistanceMixin, LpDistance):
        def __init__(self) -> None:
            super().__init__(normalize_embeddings=True, p=2, power=1)  # what the miner asserts
            self.slots, self.spec = slots, similarity

        def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return (2 - 2 * self._similarity(query_emb, ref_emb, centered=True)).clamp_min(1e-12).sqrt()

        def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return (2 - 2 * self._paired(query_emb, ref_emb, centered=True)).clamp_min(1e-12).sqrt()

    return SetSimilarity() if like.is_inverted else SetL2()


class SpecLoss(nn.Module):
    """A base loss that compares embeddings by the head's :class:`SimilaritySpec` itself (sets included),
    instead of through a pytorch-metric-learning distance; ``forward(embeddings, labels)``."""

    def __init__(self, similarity: SimilaritySpec = COSINE) -> None:
        super().__init__()
        self.similarity = similarity


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


class _GatheredLoss(nn.Module):
    """A :class:`SpecLoss` over the global batch under DDP: the other ranks' embeddings gathered without
    gradient; multiplied by the world size, as pytorch-metric-learning's wrapper returns it."""

    def __init__(self, loss: SpecLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: Any = None) -> torch.Tensor:
        from stages.core.training.distributed import gather_all, world_size

        emb, lab = gather_all(embeddings, labels)
        return self.loss(emb, lab) * world_size()


class DMLLoss(nn.Module):
    """A PML loss with its optional miner; labels must be dense 0..C-1 (proxies index by them).

    Set embeddings (B x K x D) are handed to PML as B x K*D rows, which only a set distance (one made by
    :func:`set_distance`, reshaping each row back to K slots) may compare: anything else is an error.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, lr: float | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.lr = lr
        object.__setattr__(self, "_loss_fn", loss)
        object.__setattr__(self, "_miner_fn", miner)

    def distribute(self) -> None:
        """Loss and miner over the global batch (pytorch-metric-learning's wrappers gather the other ranks'
        embeddings; the loss comes back multiplied by the world size, for DDP's gradient averaging)."""
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        # Not registered as submodules: the state dict keeps the plain loss's keys, so a checkpoint resumes
        # under any process count.
        wrapped = _GatheredLoss(self.loss) if isinstance(self.loss, SpecLoss) else DistributedLossWrapper(self.loss)
        object.__setattr__(self, "_loss_fn", wrapped)
        if self.miner is not None:
            object.__setattr__(self, "_miner_fn", DistributedMinerWrapper(self.miner))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.loss, SpecLoss):  # compares by the head's similarity itself, sets included
            return self._loss_fn(embeddings, labels)
        if embeddings.ndim == 3:
            if not isinstance(self.loss.distance, _SetDistanceMixin):
                raise ValueError("set embeddings (B x K x D) need a set distance (losses.set_distance)")
            embeddings = embeddings.flatten(1)
        pairs = self._miner_fn(embeddings, labels) if self._miner_fn is not None else None
        return self._loss_fn(embeddings, labels, pairs)

    def param_groups(self) -> list[dict[str, Any]]:
        """The loss's own learnable parameters as one optimiser group with its own lr (no weight decay)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0, "name": "loss"}
        if self.lr is not None:
            group["lr"] = self.lr
        return [group]


DMLFactory = Callable[..., DMLLoss]
DML_LOSSES: Registry[DMLFactory] = Registry("DML loss")


# Arguments every factory receives from the code, not from ``losses.<name>`` in params.yaml (``similarity``:
# the head's spec, for the losses that compare by it themselves).
_INJECTED = ("num_classes", "embed_dim", "distance", "similarity")


def check_loss_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """``losses.<name>`` names a registered loss and holds only keywords its factory takes."""
    factory = DML_LOSSES.get(name)
    signature = inspect.signature(factory)
    allowed = [p for p in signature.parameters if p not in _INJECTED]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise LangdmlError(f"losses.{name}.{unknown[0]}: unknown keyword; allowed keys: {', '.join(allowed)}")


def build_dml_loss(
    name: str,
    num_classes: int,
    embed_dim: int,
    kwargs: dict[str, Any] | None = None,
    *,
    distance: Any = None,
    similarity: SimilaritySpec = COSINE,
    slots: int = 1,
) -> DMLLoss:
    """Look ``name`` up and pass ``params.losses[name]``; ``distance`` (a PML distance) replaces the
    loss's and miner's default when given. A set ``similarity`` (the head's): the embeddings are sets of
    ``slots`` ``embed_dim``-d slots, compared by it in the loss's own form (:func:`set_distance`)."""
    kwargs = dict(kwargs or {})
    check_loss_kwargs(name, kwargs)
    factory = DML_LOSSES.get(name)
    if "similarity" in inspect.signature(factory).parameters:  # a SpecLoss: sets need no adapter
        return factory(num_classes, embed_dim, similarity=similarity, **kwargs)
    if not similarity.sets:
        return factory(num_classes, embed_dim, distance=distance, **kwargs)
    with torch.random.fork_rng(devices=[]):  # a throwaway build: it must not move the RNG (proxies' init)
        like = factory(num_classes, embed_dim, **kwargs).loss.distance
    return factory(num_classes, slots * embed_dim, distance=set_distance(like, slots, similarity), **kwargs)


def _with(distance: Any) -> dict[str, Any]:
    """The PML keyword that swaps the distance, or nothing (each loss keeps its own default)."""
    return {} if distance is None else {"distance": distance}


@DML_LOSSES.register("multisimilarity")
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


@DML_LOSSES.register("multisimilarity_roth")
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


@DML_LOSSES.register("margin")
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


@DML_LOSSES.register("triplet")
def _triplet(num_classes: int, embed_dim: int, margin: float = 0.2, distance: Any = None) -> DMLLoss:
    from pytorch_metric_learning import losses, miners

    return DMLLoss(
        losses.TripletMarginLoss(margin=margin, **_with(distance)),
        miners.TripletMarginMiner(margin, type_of_triplets="semihard", **_with(distance)),
    )


@DML_LOSSES.register("contrastive")
def _contrastive(
    num_classes: int, embed_dim: int, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: Any = None
) -> DMLLoss:
    from pytorch_metric_learning import losses

    return DMLLoss(losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, **_with(distance)))


@DML_LOSSES.register("proxy_anchor")
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
