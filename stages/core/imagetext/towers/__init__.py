"""Text towers of the image-text model, found by name (``imagetext.features.text_tower``): one module each here.

- ``frozen:<encoder>``: a frozen text encoder's token features (``frozen:sentence-transformers:...``,
  ``frozen:hf:...``), cached once by ``imagetext_features``; only the set head trains on them.
- ``bigru:<word vectors>``: DivE's released text tower (kdwonn/DivE ``model_spm.py:EncoderText`` with
  ``--wemb_type glove --txt_pooling rnn --gpo_rnn --txt_attention_input wemb``): trainable word embeddings
  initialised from word vectors, dropout, a bi-GRU of width ``embed_dim`` whose final states (mean of the two
  directions) are the global feature; the set head attends over the word embeddings. The vocabulary is every
  word of the training captions plus ``<pad> <start> <end> <unk> <mask>`` (the official ``vocab.py`` rows);
  the cache holds token ids. Word vectors: ``glove:6B-50d`` (bundled), ``file:<path>`` (a GloVe text file such
  as glove.840B.300d.txt, torchtext's default GloVe) or ``random:<dim>`` (``--wemb_type none``).
- ``hf:<model>``: a Hugging Face transformer fine-tuned under the set head (the paper's BERT rows,
  ``EncoderTextBERT``: its token states projected to ``embed_dim``, the first token's as the global feature);
  the cache holds the tokenizer's ids.

Each tower has a cache half (:meth:`TowerKind.cache`, run by ``imagetext_features``), a query half
(:meth:`TowerKind.tokenizer`: a caption -> what the cache would hold, for ``langdml search --text``) and a
module half (:meth:`TowerKind.build`, :meth:`TowerKind.initialise`). What the cache half found is one typed
:class:`TextTower` (spec, token budget, vocabulary size, mask id, and the tower's own details), written once
as ``text_tower.json``, saved with the model and passed to every other half. A new tower is one module here
registering a :class:`TowerKind` (the registry finds it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from stages.core.registry import Registry, parse_spec

HeadFactory = Callable[..., nn.Module]  # (token channels, project=...) -> a set head
Tokenizer = Callable[[list[str]], list[np.ndarray]]
SPEC_KEY = "imagetext.features.text_tower"


@dataclass(frozen=True)
class TextTower:
    """What the features stage cached for a text tower, parsed once: the spec (``family:arg``), the token
    budget, for a tower over token ids the vocabulary size and the mask token (DivE's caption drop), and the
    tower's own ``details`` (a vocabulary, a width, a transformer config). ``to_json`` is ``text_tower.json``."""

    spec: str
    max_tokens: int
    vocab_size: int | None = None
    mask_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return parse_spec(self.spec, kind=SPEC_KEY, require_arg=True)[0]

    @property
    def arg(self) -> str:
        return parse_spec(self.spec, kind=SPEC_KEY, require_arg=True)[1]

    @property
    def kind(self) -> TowerKind:
        return TEXT_TOWERS.get(self.family)

    def to_json(self) -> dict[str, Any]:
        ids = {"mask_id": self.mask_id, "vocab_size": self.vocab_size} if self.vocab_size is not None else {}
        return {"tower": self.spec, "max_tokens": self.max_tokens, **self.details, **ids}

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> TextTower:
        details = {k: v for k, v in info.items() if k not in ("tower", "max_tokens", "mask_id", "vocab_size")}
        vocab = info.get("vocab_size")
        return cls(info["tower"], int(info["max_tokens"]), vocab, info.get("mask_id"), details)


@dataclass
class CaptionCache:
    """What ``imagetext_features`` stores for the captions: one array per caption (L x C features or L ids),
    the tower's description (saved with the model too), and extra arrays (``<name>.npy``)."""

    sets: list[np.ndarray]
    tower: TextTower
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class TowerKind:
    """One family of text towers; ``arg`` is what follows ``family:`` in the spec."""

    def cache(
        self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any, words: Any = None
    ) -> CaptionCache:
        """What the features stage stores for ``texts`` (``train``: the rows a vocabulary may be built from);
        ``words``: a word tower's tokenizer and vocabulary rules (``WordRules``; other towers ignore it)."""
        raise NotImplementedError

    def tokenizer(self, tower: TextTower, device: Any) -> Tokenizer:
        raise NotImplementedError

    def build(self, tower: TextTower, head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        raise NotImplementedError

    def initialise(self, module: nn.Module, tower: TextTower, arrays: dict[str, np.ndarray]) -> None:
        """Pretrained weights into a freshly built tower, before training (nothing by default)."""


TEXT_TOWERS: Registry[TowerKind] = Registry("text tower", discover=__name__)


def tower_kind(spec: str) -> tuple[TowerKind, str]:
    """The registered family of a ``family:arg`` spec, and its argument."""
    family, arg = parse_spec(spec, kind=SPEC_KEY, require_arg=True)
    return TEXT_TOWERS.get(family), arg


def augment_ids(ids: np.ndarray, prob: float, vocab_size: int, mask_id: int, rng: np.random.Generator) -> np.ndarray:
    """DivE's caption augmentation (``data.py:tokenize``): each inner token (the first and last, the start and
    end markers, are kept) is, with probability ``prob``, replaced by the mask token (half of those cases),
    by a random token (a tenth) or deleted (the other 40%)."""
    if prob <= 0 or len(ids) <= 2:
        return ids
    u = rng.random(len(ids) - 2)
    r = u / prob
    inner = ids[1:-1].copy()
    inner = np.where((u < prob) & (r < 0.5), mask_id, inner)
    swap = (u < prob) & (r >= 0.5) & (r < 0.6)
    inner[swap] = rng.integers(0, vocab_size, int(swap.sum()))
    keep = ~((u < prob) & (r >= 0.6))
    return np.concatenate([ids[:1], inner[keep], ids[-1:]]).astype(ids.dtype)


def drop_regions(tokens: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """DivE's region dropping (``data.py``, ``--butd_drop_prob``): each token kept where a uniform draw
    exceeds ``prob`` (at least one is kept)."""
    if prob <= 0:
        return tokens
    keep = rng.random(len(tokens)) > prob
    if not keep.any():
        keep[rng.integers(len(tokens))] = True
    return tokens[keep]
