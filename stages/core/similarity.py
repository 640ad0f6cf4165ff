"""Similarities of two batches of embeddings, found by name (``language.similarity``, losses, evaluation).

A batch is N x D (one vector per sample) or N x K x D (a set of K unit vectors, DivE). Each registered
entry is a factory ``(alpha, centered) -> similarity``, the similarity a pure function
``(a, b) -> B1 x B2``.

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
from functools import partial

import torch
import torch.nn.functional as F

from stages.core.registry import Registry

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SimilarityFactory = Callable[[float, bool], Similarity]
SIMILARITIES: Registry[SimilarityFactory] = Registry("similarity")

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


@SIMILARITIES.register("cosine")
def _cosine(alpha: float = 16.0, centered: bool = True) -> Similarity:
    """The cosine takes no options (alpha and centered are for set similarities)."""
    return cosine


@SIMILARITIES.register("smooth_chamfer")
def _smooth_chamfer(alpha: float = 16.0, centered: bool = False) -> Similarity:
    return partial(smooth_chamfer, alpha=alpha, centered=centered)


def make_similarity(name: str, *, alpha: float = 16.0, centered: bool = False) -> Similarity:
    """The registered similarity ``name`` with its options."""
    return SIMILARITIES.get(name)(alpha, centered)
