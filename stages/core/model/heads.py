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

How a set module treats padding is a switch (:data:`PADDING`, ``SlotOptions.padding``):
- ``exact`` (the default): padded inputs get exactly no weight (the mask zeroes them AFTER the softmax over
  slots) and each set's sine positions run over its own length, so a set embeds the same alone or padded in
  any batch;
- ``official`` (kdwonn/DivE ``agg_block/attention.py`` and ``pos_encoding.py``, which the published models were
  trained with): padded keys are filled with ``-max`` BEFORE the softmax over slots, so every padded input keeps
  1/K of each slot's weight before the renormalisation over inputs, and positions 1..N run over the padded
  batch length N (pads included), so a caption's embedding depends on the longest caption of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.config import ModelParams
from stages.core.errors import LangdmlError
from stages.core.model.similarity import COSINE, SimilaritySpec
from stages.core.registry import Registry

EPS = 1e-7  # added to the per-slot attention mass before renormalising over inputs, as in the official code
PADDING = ("exact", "official")  # how a set module treats padded inputs (module docstring)

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


@dataclass(frozen=True)
class SlotOptions:
    """The set module's details that the official image-text recipe sets (``train_eval_coco.sh``); the
    defaults are the DML head's (no dropout, the mean as the global feature, attention width = embed_dim).

    ``head_dim``: the width of each attention head (official ``dim_head`` 512 with 4 heads; None = the
    embedding width split over the heads). ``dropout``: after the attention's output projection and inside
    the feed-forward (``--dropout``). ``global_pool``: how the projected tokens become the global feature
    (``--img_res_pool``). ``local_dropout``: on the projected tokens (``--img_1x1_dropout``). ``local_bn``:
    BatchNorm inside the projection MLP (``--gpo_1x1``'s MLP). ``project``: project the tokens before the
    attention (``--spm_1x1``; the official text tower attends over the raw word embeddings). ``key_positions``:
    a sine encoding of each token's position added to the keys (``--spm_txt_pos_enc_type sine``).
    ``padding``: ``exact`` or ``official`` (the module docstring). ``separate_global``: the global feature is
    pooled from a second pass through the projection (kdwonn/DivE ``model_spm.py``, ``EncoderImage``: ``spm_fc``
    runs once for the local tokens and again inside ``residual_connection``, with its own dropout mask and
    BatchNorm update); False pools the one projected tensor. Both equal at evaluation."""

    head_dim: int | None = None
    dropout: float = 0.0
    global_pool: str = "mean"
    local_dropout: float = 0.0
    local_bn: bool = False
    project: bool = True
    key_positions: bool = False
    padding: str = "exact"
    separate_global: bool = False


def sine_positions(mask: torch.Tensor, dim: int, padding: str = "exact") -> torch.Tensor:
    """B x N x ``dim`` sine/cosine encodings of token positions (kdwonn/DivE ``agg_block/pos_encoding.py``,
    ``PositionEmbeddingSine1D`` with normalize=True): even channels sine, odd channels cosine of
    position / 10000^(2 floor(i/2) / dim), positions normalised to (0, 2 pi]. ``exact``: positions 1..L_b of
    each set's valid tokens over its own length L_b, padding 0; ``official``: positions 1..N of every slot of
    the padded batch over its length N (pads included), as the official code."""
    keep = (~mask).float() if padding == "exact" else torch.ones_like(mask, dtype=torch.float32)
    pos = keep.cumsum(dim=1)
    pos = pos / (pos[:, -1:].clamp_min(1.0) + 1e-6) * 2 * math.pi
    freq = 10000.0 ** (2 * (torch.arange(dim, device=mask.device) // 2) / dim)
    angle = pos[..., None] / freq
    out = torch.where(torch.arange(dim, device=mask.device) % 2 == 0, angle.sin(), angle.cos())
    return out * keep[..., None]


class SlotCrossAttention(nn.Module):
    """Multi-head cross-attention of K slot queries over N inputs, softmax over slots, then over inputs."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        head_dim: int | None = None,
        dropout: float = 0.0,
        padding: str = "exact",
    ) -> None:
        super().__init__()
        if padding not in PADDING:
            raise LangdmlError(f"padding must be one of {', '.join(PADDING)}, got {padding!r}")
        self.padding = padding
        if head_dim is None and dim % heads:
            raise LangdmlError(f"model.embed_dim ({dim}) must be a multiple of model.slot_heads ({heads})")
        context_dim = context_dim or dim
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # B x h x n x d/h

    def forward(
        self,
        slots: torch.Tensor,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(update B x K x D, attention B x K x N averaged over heads); ``mask`` B x N, True = padding;
        ``key_positions`` (B x N x C) are added to the normalised inputs for the keys only."""
        q = self._split(self.to_q(self.norm_slots(slots)))
        context = self.norm_inputs(inputs)
        keys = context if key_positions is None else context + key_positions.to(context.dtype)
        k, v = self._split(self.to_k(keys)), self._split(self.to_v(context))
        logits = q @ k.transpose(-1, -2) * self.scale  # B x h x K x N
        if mask is not None and self.padding == "official":  # before the softmax over slots: 1/K each
            logits = logits.masked_fill(mask[:, None, None, :], -torch.finfo(logits.dtype).max)
        attn = logits.softmax(dim=-2)  # softmax over slots
        if mask is not None and self.padding == "exact":
            attn = attn.masked_fill(mask[:, None, None, :], 0.0)  # after the softmax: exactly zero weight
        attn = attn / (attn.sum(dim=-1, keepdim=True) + EPS)  # each slot: a weighted mean of its inputs
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.dropout(self.to_out(out)), attn.mean(dim=1)


class SlotBlock(nn.Module):
    """Pre-norm cross-attention then a pre-norm 4x GELU feed-forward (dropout after the GELU), each with a
    residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ff_mult: int = 4,
        context_dim: int | None = None,
        head_dim: int | None = None,
        dropout: float = 0.0,
        padding: str = "exact",
    ) -> None:
        super().__init__()
        self.attention = SlotCrossAttention(dim, heads, context_dim, head_dim, dropout, padding)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * dim, dim),
        )

    def forward(
        self,
        slots: torch.Tensor,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        update, attn = self.attention(slots, inputs, mask, key_positions)
        slots = slots + update
        return slots + self.ff(slots), attn


class SequenceBatchNorm(nn.Module):
    """BatchNorm1d over the last axis of a B x N x D tensor (padding included, as the official ``SequenceBN``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def masked_pool(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """B x N x D -> B x D: the mean or the max over the valid (unmasked) tokens."""
    if how == "max":
        return x.max(dim=1).values if mask is None else x.masked_fill(mask.unsqueeze(-1), -math.inf).max(dim=1).values
    if mask is None:
        return x.mean(dim=1)
    keep = (~mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class DivEHead(nn.Module):
    """K slots over the grid cells of the feature map (see the module docstring)."""

    def __init__(
        self,
        channels: int,
        embed_dim: int,
        slots: int = 4,
        depth: int = 4,
        heads: int = 4,
        alpha: float = 16.0,
        options: SlotOptions = SlotOptions(),
    ) -> None:
        super().__init__()
        self.slots = slots
        self.options = options
        self.similarity = SimilaritySpec("smooth_chamfer", alpha=alpha)
        self.depth = depth
        if options.project:
            self.local = nn.Linear(channels, embed_dim)
            # DivE's residual MLP on the projected local features (its ``gpo_1x1``).
            bn = [SequenceBatchNorm(embed_dim // 2)] if options.local_bn else []
            self.local_mlp = nn.Sequential(
                nn.Linear(embed_dim, embed_dim // 2), *bn, nn.ReLU(), nn.Linear(embed_dim // 2, embed_dim)
            )
            self.local_dropout = nn.Dropout(options.local_dropout)
        context = embed_dim if options.project else channels
        # Unit-variance queries as in the official code: scaled down to norm ~1 they are swamped by the
        # first attention update and the slots start (and stay) nearly identical (slot cosine 0.98 at init).
        self.queries = nn.Parameter(torch.randn(slots, embed_dim))
        # one block, applied ``depth`` times: weight-tied
        self.block = SlotBlock(
            embed_dim,
            heads,
            context_dim=context,
            head_dim=options.head_dim,
            dropout=options.dropout,
            padding=options.padding,
        )
        self.norm_slots = nn.LayerNorm(embed_dim)
        self.norm_global = nn.LayerNorm(embed_dim)

    def set_module(self) -> list[nn.Parameter]:
        """The set prediction module (DivE's ``spm``: slot queries, the slot block, the output norms), which
        the official image-text training gives its own learning rate."""
        return [self.queries, *self.block.parameters(), *self.norm_slots.parameters(), *self.norm_global.parameters()]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The local features: the tokens through the projection and its residual MLP (or as they are)."""
        if not self.options.project:
            return tokens
        local = self.local(tokens)
        return self.local_dropout(local + self.local_mlp(local))

    def forward_tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, glob: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``tokens`` B x N x C (grid cells, regions or words), ``mask`` B x N with True at padding; ``glob``
        (B x D) is a global feature from elsewhere (a text tower's GRU), else the pooled local features."""
        local = self.project(tokens)
        if glob is None:
            pooled = self.project(tokens) if self.options.separate_global and self.options.project else local
            glob = masked_pool(pooled, mask, self.options.global_pool)
        positions = None
        if self.options.key_positions:
            padding = torch.zeros(local.shape[:2], dtype=torch.bool, device=local.device) if mask is None else mask
            positions = sine_positions(padding, local.shape[-1], self.options.padding)
        slots = self.queries.expand(tokens.shape[0], -1, -1)
        attn = None
        for _ in range(self.depth):
            slots, attn = self.block(slots, local, mask, positions)
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
