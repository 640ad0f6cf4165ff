"""How embeddings are compared: the registered similarities and the :class:`SimilaritySpec` a head carries.

A batch is N x D (one vector per sample) or N x K x D (a set of K unit vectors, DivE). Each registered
entry (:class:`SimilarityKind`) makes the pure function ``(a, b) -> B1 x B2`` from its options and says
whether it compares sets. A head states its spec (name + options); the base loss's distance, the language
term's image side, the evaluation searcher and cross-modal recall all take it from there, and
:meth:`SimilaritySpec.layout` is the one place that turns an array of either rank into what the
similarity compares.

``smooth_chamfer`` (Kim, Kim, Kwak, CVPR 2023) compares sets X (K1 slots) and Y (K2 slots) by
``SC = 1/(2 alpha K1) sum_k LSE_l(alpha s_kl) + 1/(2 alpha K2) sum_l LSE_k(alpha s_kl)``, s_kl = <x_k, y_l>.
It lies in [Chamfer, Chamfer + (log K1 + log K2)/(2 alpha)]; ``centered`` subtracts that offset, which puts
it between the mean pairwise cosine and the Chamfer similarity, on the cosine's scale. It is computed with
log-sum-exp (the official exp-then-log overflows float32 above alpha ~ 88), in float32 at least, and in
row chunks so that memory stays bounded for large B1 x B2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.errors import LangdmlError
from stages.core.registry import Registry
from stages.core.vectors import l2_normalize

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIMILARITIES: Registry[SimilarityKind] = Registry("similarity")

# Slot-pair similarities held at once by smooth_chamfer (B1 chunk x B2 x K1 x K2): 64 MB in float32.
CHAMFER_BUDGET = 2**24


def as_sets(x: torch.Tensor) -> torch.Tensor:
    """N x D -> N x 1 x D; N x K x D unchanged; anything else is an error."""
    if x.ndim == 2:
        return x.unsqueeze(1)
    if x.ndim != 3:
        raise ValueError(f"expected N x D or N x K x D embeddings, got shape {tuple(x.shape)}")
    return x


def set_mean(x: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of each set's slots (N x K x D -> N x D); N x D is returned as it is."""
    return x if x.ndim == 2 else F.normalize(x.mean(dim=1), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner products of L2-normalised rows; a set (N x K x D) is reduced to its normalised slot mean."""
    return set_mean(a) @ set_mean(b).T


def smooth_chamfer(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float = 16.0, centered: bool = False, budget: int = CHAMFER_BUDGET
) -> torch.Tensor:
    """Smooth-Chamfer similarity of every set in ``x`` (B1 x K1 x D) with every set in ``y`` (B2 x K2 x D).

    K1 = K2 = 1 returns the cosine exactly. Differentiable; at least float32 under autocast.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    xs, ys = as_sets(x), as_sets(y)
    (b1, k1, d), (b2, k2, d2) = xs.shape, ys.shape
    if d != d2:
        raise ValueError(f"set dimensions differ: {d} vs {d2}")
    dtype = torch.promote_types(torch.promote_types(xs.dtype, ys.dtype), torch.float32)
    with torch.autocast(device_type=xs.device.type, enabled=False):
        xs, ys = xs.to(dtype), ys.to(dtype)
        if k1 == k2 == 1:
            return xs[:, 0] @ ys[:, 0].T
        rows = max(1, budget // max(1, b2 * k1 * k2))
        parts = [
            chamfer_from_slot_similarities(torch.einsum("ikd,jld->ijkl", xs[start : start + rows], ys), alpha, centered)
            for start in range(0, b1, rows)
        ]
        return torch.cat(parts)


def chamfer_from_slot_similarities(s: torch.Tensor, alpha: float, centered: bool = False) -> torch.Tensor:
    """smooth-Chamfer from slot similarities ``s`` (... x K1 x K2) -> (...)."""
    k1, k2 = s.shape[-2:]
    a = alpha * s
    forward = torch.logsumexp(a, dim=-1).mean(dim=-1)  # each x slot to its soft-nearest y slot
    backward = torch.logsumexp(a, dim=-2).mean(dim=-1)  # each y slot to its soft-nearest x slot
    out = (forward + backward) / (2 * alpha)
    return out - (math.log(k1) + math.log(k2)) / (2 * alpha) if centered else out


def smooth_chamfer_upper_bound(tau: torch.Tensor, k2: int, *, alpha: float, centered: bool = False) -> torch.Tensor:
    """An upper bound on SC(X, Y) for every set Y whose slot similarities to X's slot i are all <= tau[..., i].

    ``tau``: ... x K1. Each LSE_l(alpha s_il) <= alpha tau_i + log K2 and each LSE_i(alpha s_il) <=
    LSE_i(alpha tau_i), so SC <= mean_i(tau_i)/2 + log(K2)/(2 alpha) + LSE_i(alpha tau_i)/(2 alpha).
    """
    k1 = tau.shape[-1]
    bound = tau.mean(dim=-1) / 2 + math.log(k2) / (2 * alpha) + torch.logsumexp(alpha * tau, dim=-1) / (2 * alpha)
    if centered:
        bound = bound - (math.log(k1) + math.log(k2)) / (2 * alpha)
    return bound


@dataclass(frozen=True)
class SimilarityKind:
    """A registered similarity: ``make(alpha, centered)`` gives the pure function ``(a, b) -> B1 x B2``;
    ``sets`` says whether it compares sets of slots (N x K x D) or single vectors (N x D)."""

    make: Callable[[float, bool], Similarity]
    paired: Callable[[float, bool], Similarity]  # row i of a with row i of b -> B
    sets: bool


def _paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (set_mean(a) * set_mean(b)).sum(dim=-1)


def _paired_chamfer(a: torch.Tensor, b: torch.Tensor, *, alpha: float, centered: bool) -> torch.Tensor:
    return chamfer_from_slot_similarities(torch.einsum("nkd,nld->nkl", as_sets(a), as_sets(b)), alpha, centered)


SIMILARITIES.register("cosine")(
    SimilarityKind(lambda alpha, centered: cosine, lambda alpha, centered: _paired_cosine, sets=False)
)
SIMILARITIES.register("smooth_chamfer")(
    SimilarityKind(
        lambda alpha, centered: partial(smooth_chamfer, alpha=alpha, centered=centered),
        lambda alpha, centered: partial(_paired_chamfer, alpha=alpha, centered=centered),
        sets=True,
    )
)


@dataclass(frozen=True)
class SimilaritySpec:
    """How a head's outputs are compared: a registered similarity and its options. Every consumer (the
    base loss's distance, the language term's image side, the evaluation searcher, cross-modal recall)
    takes it from the head, and :meth:`layout` is the one place that decides what an array's rank means."""

    name: str = "cosine"
    alpha: float = 16.0
    centered: bool = False

    @property
    def sets(self) -> bool:
        """True when it compares sets of slots (N x K x D); False for one vector per sample."""
        return SIMILARITIES.get(self.name).sets

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options of its searcher and distance (none for the cosine)."""
        return {"alpha": self.alpha, "centered": self.centered} if self.sets else {}

    def centred(self) -> SimilaritySpec:
        """The same similarity on the cosine's scale (what the language term compares)."""
        return replace(self, centered=True)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B1 x B2 similarities of two batches (torch, differentiable)."""
        return SIMILARITIES.get(self.name).make(self.alpha, self.centered)(a, b)

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The similarity of row i of ``a`` with row i of ``b`` (B)."""
        return SIMILARITIES.get(self.name).paired(self.alpha, self.centered)(a, b)

    def layout(self, x: np.ndarray) -> np.ndarray:
        """``x`` as this similarity's searcher takes it, unit rows (per slot) in float32: N x D for the
        cosine (a set of one slot is that slot; more slots cannot be compared by it), N x K x D for a set
        similarity (a single vector is a set of one)."""
        x = np.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(f"expected N x D or N x K x D embeddings, got shape {x.shape}")
        if self.sets and x.ndim == 2:
            x = x[:, None, :]
        elif not self.sets and x.ndim == 3:
            if x.shape[1] != 1:
                raise LangdmlError(
                    f"embeddings are sets (N x K x D = {' x '.join(map(str, x.shape))}); the cosine compares "
                    "single vectors: compare them by smooth_chamfer instead of flattening the set"
                )
            x = x[:, 0]
        return l2_normalize(x)

    def single_vectors(self, x: np.ndarray) -> np.ndarray:
        """One unit vector per sample, for what needs one (k-means for NMI): a set's normalised slot mean."""
        return self.layout(x) if not self.sets else l2_normalize(self.layout(x).mean(axis=1))


COSINE = SimilaritySpec("cosine")
