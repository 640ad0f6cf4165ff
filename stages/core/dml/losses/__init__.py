"""The base DML losses by name (``train.loss``): one module per family in this package, found by the registry.

Each registered factory returns a :class:`DMLLoss` (loss + miner) that also says which of its parameters
need their own optimiser group (margin's beta, proxy-anchor's proxies). A PML-based factory takes an
optional PML ``distance``; for a set head, :func:`set_distance` turns the head's :class:`SimilaritySpec`
into one in the form its :class:`LossKind` declares, so a set similarity plugs in under every loss and miner
unchanged. A loss that compares by the spec itself (:class:`SpecLoss`, ``by_spec``) takes ``similarity``.
New loss: a module here with a ``@dml_loss("name")`` factory (docs/development.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
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


def set_distance(inverted: bool, slots: int, similarity: SimilaritySpec) -> Any:
    """A pytorch-metric-learning distance over flattened sets in the form the loss's own default has
    (:attr:`LossKind.inverted`): the set similarity where the loss compares by similarity, an L2-like
    distance sqrt(2 - 2 S_centred) where it compares by distance (margin, triplet, contrastive)."""
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

    return SetSimilarity() if inverted else SetL2()


class SpecLoss(nn.Module):
    """A base loss that compares embeddings by the head's :class:`SimilaritySpec` itself (sets included),
    instead of through a pytorch-metric-learning distance; ``forward(embeddings, labels)``."""

    def __init__(self, similarity: SimilaritySpec = COSINE) -> None:
        super().__init__()
        self.similarity = similarity


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

    Set embeddings (B x K x D) are handed to PML as B x K*D rows, compared by the set distance that
    :func:`build_dml_loss` gave it (:func:`set_distance` reshapes each row back to K slots); ``sets`` says so.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, lr: float | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.lr = lr
        self.sets = False  # set by build_dml_loss for a set head under a PML loss: rows are flattened sets
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
        if self.sets:
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


@dataclass(frozen=True)
class LossKind:
    """A registered base loss: its factory and how it compares embeddings. ``by_spec``: by the head's
    :class:`SimilaritySpec` itself (a :class:`SpecLoss`; sets need no adapter; the factory takes
    ``similarity``); else through a PML distance whose default is a similarity (``inverted``, e.g. the
    cosine) or a distance (L2), the form a set head's :func:`set_distance` must take."""

    factory: DMLFactory
    by_spec: bool = False
    inverted: bool = True


DML_LOSSES: Registry[LossKind] = Registry("DML loss", discover=__name__)


def dml_loss(name: str, *, by_spec: bool = False, inverted: bool = True) -> Callable[[DMLFactory], DMLFactory]:
    """Decorator: register a factory ``(num_classes, embed_dim, **keywords) -> DMLLoss`` under ``name``."""

    def add(factory: DMLFactory) -> DMLFactory:
        DML_LOSSES.register(name)(LossKind(factory, by_spec, inverted))
        return factory

    return add


# Arguments every factory receives from the code, not from ``losses.<name>`` in params.yaml (``similarity``:
# the head's spec, for the losses that compare by it themselves).
_INJECTED = ("num_classes", "embed_dim", "distance", "similarity")


def check_loss_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """``losses.<name>`` names a registered loss and holds only keywords its factory takes."""
    signature = inspect.signature(DML_LOSSES.get(name).factory)
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
    kind = DML_LOSSES.get(name)
    if kind.by_spec:
        return kind.factory(num_classes, embed_dim, similarity=similarity, **kwargs)
    if not similarity.sets:
        return kind.factory(num_classes, embed_dim, distance=distance, **kwargs)
    loss = kind.factory(
        num_classes, slots * embed_dim, distance=set_distance(kind.inverted, slots, similarity), **kwargs
    )
    loss.sets = True
    return loss
