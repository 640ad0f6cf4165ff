"""Embedding heads over a backbone's feature map, found by name (``model.head``).

A head maps a B x C x h x w feature map to a dict with ``embeddings``: L2-normalised, B x D (``linear``)
or B x K x D (``dive``, a set of K slots), plus whatever else it exposes (the slot residuals for the
diversity term, the attention maps for pictures). ``similarity`` (a :class:`SimilaritySpec`) states how its
embeddings are compared, for every consumer.

``dive`` is the set prediction module of DivE (Kim, Kim, Kwak, CVPR 2023; kdwonn/DivE ``agg_block``,
``model_spm.py``): the grid cells projected to the embedding width with a residual MLP are the local
features, their mean the global one; K learned queries are refined by one pre-norm cross-attention +
feed-forward block applied ``depth`` times (weight-tied), the attention softmaxed over the SLOTS and then
renormalised over the inputs (slot attention); output ``LN(slots) + LN(global)``, each slot L2-normalised.
Unlike the official code, a padding mask zeroes masked inputs AFTER the softmax over slots, so they get
exactly no weight (the official masks before it, leaving each padded input 1/K of every slot).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.config import ModelParams
from stages.core.errors import LangdmlError
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.registry import Registry

EPS = 1e-7  # added to the per-slot attention mass before renormalising over inputs, as in the official code

HeadFactory = Callable[[int, ModelParams], nn.Module]
HEADS: Registry[HeadFactory] = Registry("head")


def global_pool(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """``avg`` or ``avg+max`` (the sum, as in the paper's code) over the spatial dims: B x C."""
    avg = fmap.mean(dim=(2, 3))
    if pooling == "avg":
        return avg
    if pooling == "avg+max":
        return avg + fmap.amax(dim=(2, 3))
    raise LangdmlError(f"model.pooling must be avg or avg+max, got {pooling!r}")


class LinearHead(nn.Linear):
    """Global pooling, one linear map, L2 normalisation: one vector per image (the paper's head)."""

    similarity = COSINE
    slots = None

    def __init__(self, channels: int, embed_dim: int, pooling: str) -> None:
        super().__init__(channels, embed_dim)
        self.pooling = pooling

    def forward(self, fmap: torch.Tensor) -> dict[str, Any]:
        # Normalise in float32: under bf16 autocast the head output is bf16, the losses want float32.
        return {"embeddings": F.normalize(super().forward(global_pool(fmap, self.pooling)).float(), dim=-1)}

    def maps(self, fmap: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Where the pooled vector's energy comes from: the feature norm of each grid cell (B x 1 x h x w)."""
        return fmap.float().norm(dim=1, keepdim=True), ["feature norm (no slots)"]


class SlotCrossAttention(nn.Module):
    """Multi-head cross-attention of K slot queries over N inputs, softmax over slots, then over inputs."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise LangdmlError(f"model.embed_dim ({dim}) must be a multiple of model.slot_heads ({heads})")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # B x h x n x d/h

    def forward(
        self, slots: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(update B x K x D, attention B x K x N averaged over heads); ``mask`` B x N, True = padding."""
        q = self._split(self.to_q(self.norm_slots(slots)))
        context = self.norm_inputs(inputs)
        k, v = self._split(self.to_k(context)), self._split(self.to_v(context))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-2)  # B x h x K x N, softmax over slots
        if mask is not None:
            attn = attn.masked_fill(mask[:, None, None, :], 0.0)  # after the softmax: exactly zero weight
        attn = attn / (attn.sum(dim=-1, keepdim=True) + EPS)  # each slot: a weighted mean of its inputs
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.to_out(out), attn.mean(dim=1)


class SlotBlock(nn.Module):
    """Pre-norm cross-attention then a pre-norm 4x GELU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.attention = SlotCrossAttention(dim, heads)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim)
        )

    def forward(
        self, slots: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        update, attn = self.attention(slots, inputs, mask)
        slots = slots + update
        return slots + self.ff(slots), attn


class DivEHead(nn.Module):
    """K slots over the grid cells of the feature map (see the module docstring)."""

    def __init__(
        self, channels: int, embed_dim: int, slots: int = 4, depth: int = 4, heads: int = 4, alpha: float = 16.0
    ) -> None:
        super().__init__()
        self.slots = slots
        self.similarity = SimilaritySpec("smooth_chamfer", alpha=alpha)
        self.depth = depth
        self.local = nn.Linear(channels, embed_dim)
        # DivE's residual MLP on the projected local features (its ``gpo_1x1``).
        self.local_mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.ReLU(), nn.Linear(embed_dim // 2, embed_dim)
        )
        # Unit-variance queries as in the official code: scaled down to norm ~1 they are swamped by the
        # first attention update and the slots start (and stay) nearly identical (slot cosine 0.98 at init).
        self.queries = nn.Parameter(torch.randn(slots, embed_dim))
        self.block = SlotBlock(embed_dim, heads)  # one block, applied ``depth`` times: weight-tied
        self.norm_slots = nn.LayerNorm(embed_dim)
        self.norm_global = nn.LayerNorm(embed_dim)

    def set_module(self) -> list[nn.Parameter]:
        """The set prediction module (DivE's ``spm``: slot queries, the slot block, the output norms), which
        the official image-text training gives its own learning rate."""
        return [self.queries, *self.block.parameters(), *self.norm_slots.parameters(), *self.norm_global.parameters()]

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """``tokens`` B x N x C (grid cells, regions or words), ``mask`` B x N with True at padding."""
        local = self.local(tokens)
        local = local + self.local_mlp(local)
        if mask is None:
            glob = local.mean(dim=1)
        else:
            keep = (~mask).unsqueeze(-1).to(local.dtype)
            glob = (local * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        slots = self.queries.expand(tokens.shape[0], -1, -1)
        attn = None
        for _ in range(self.depth):
            slots, attn = self.block(slots, local, mask)
        residual = self.norm_slots(slots)
        out = residual + self.norm_global(glob).unsqueeze(1)
        return {"embeddings": F.normalize(out.float(), dim=-1), "residual": residual.float(), "attention": attn}

    def forward(self, fmap: torch.Tensor) -> dict[str, Any]:
        """B x C x h x w -> K slots; ``attention`` B x K x (h w), row-major over the grid."""
        return self.forward_tokens(fmap.flatten(2).transpose(1, 2))

    def maps(self, fmap: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Each slot's attention over the grid cells (last block, mean over heads): B x K x h x w."""
        attn = self.forward(fmap)["attention"]
        return attn.float().unflatten(-1, fmap.shape[2:]), [f"slot {i + 1}" for i in range(self.slots)]


@HEADS.register("linear")
def _linear(channels: int, mp: ModelParams) -> nn.Module:
    return LinearHead(channels, mp.embed_dim, mp.pooling)


@HEADS.register("dive")
def _dive(channels: int, mp: ModelParams) -> nn.Module:
    return DivEHead(channels, mp.embed_dim, slots=mp.slots, depth=mp.slot_depth, heads=mp.slot_heads, alpha=mp.alpha)
