"""``bigru:<word vectors>``: DivE's released text tower (word embeddings from word vectors, a bi-GRU), over
token ids of a vocabulary (:mod:`stages.core.imagetext.vocabulary`: the tokenizer and the vocabulary rule)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.imagetext.towers import TEXT_TOWERS, CaptionCache, HeadFactory, TextTower, Tokenizer, TowerKind
from stages.core.imagetext.vocabulary import WordRules, build_vocabulary, mask_id, word_ids
from stages.core.registry import Registry, parse_spec

# A word-vector source: (arg, the words wanted) -> (width, word -> its vector or None).
WordLookup = Callable[[str], np.ndarray | None]
WORD_VECTORS: Registry[Callable[[str, set[str]], tuple[int, WordLookup]]] = Registry("bi-GRU word vectors")


@WORD_VECTORS.register("random")
def _random_vectors(arg: str, wanted: set[str]) -> tuple[int, WordLookup]:
    """No vectors (``--wemb_type none``): every row keeps its random initialisation."""
    if not arg.isdigit() or int(arg) <= 0:
        raise LangdmlError(f"bigru:random:{arg}: the width must be a positive integer, e.g. random:300")
    return int(arg), lambda word: None


@WORD_VECTORS.register("glove")
def _bundled_glove(arg: str, wanted: set[str]) -> tuple[int, WordLookup]:
    """The GloVe vectors bundled with the text encoders (``glove:6B-50d``)."""
    from stages.core.language.encoders import create_text_encoder

    glove = create_text_encoder(f"glove:{arg}")
    vocab, vectors = glove.vocab, glove.vectors  # type: ignore[attr-defined]
    return vectors.shape[1], lambda word: vectors[vocab[word]] if word in vocab else None


@WORD_VECTORS.register("file")
def _vector_file(arg: str, wanted: set[str]) -> tuple[int, WordLookup]:
    """A GloVe-format text file, streamed, only the wanted words' rows kept."""
    width, table = _read_vector_file(Path(arg), wanted)
    return width, table.get


def word_vectors(spec: str, words: list[str]) -> np.ndarray:
    """V x d initial rows for ``words`` from the word-vector source ``spec`` (:data:`WORD_VECTORS`); NaN rows
    for words it lacks (those keep their random initialisation). A word not found as is is tried without
    - . ' and before a /, the official "word-hit" trick."""
    family, arg = parse_spec(spec, kind="bi-GRU word vectors", require_arg=True)
    dim, lookup = WORD_VECTORS.get(family)(arg, set(words) | {_hit(w) for w in words})
    out = np.full((len(words), dim), np.nan, dtype=np.float32)
    for i, word in enumerate(words):
        vec = lookup(word)
        vec = lookup(_hit(word)) if vec is None else vec
        if vec is not None:
            out[i] = vec
    return out


def _hit(word: str) -> str:
    return re.sub(r"[-.']", "", word).split("/")[0]


def _read_vector_file(path: Path, wanted: set[str]) -> tuple[int, dict[str, np.ndarray]]:
    """The width and the rows of ``wanted`` words of a GloVe-format text file (word, then its numbers), streamed.

    The width is the first line's count of numbers; every line must have at least that many fields after a word,
    and a longer line's extra fields belong to its word (glove.840B.300d has words with spaces, such as
    ``. . .``, which torchtext reads the same way). A file with no numbers, a short line or a wanted row that is
    not numbers is one line naming the file and the line."""
    if not path.is_file():
        raise LangdmlError(
            f"word vectors {path} not found; download GloVe (e.g. https://nlp.stanford.edu/data/glove.840B.300d.zip, "
            "torchtext's default) and unzip it there, or use bigru:glove:6B-50d (bundled)"
        )
    expected = "GloVe text: a word, then its numbers separated by spaces, one word a line"
    table: dict[str, np.ndarray] = {}
    width = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip().split(" ")
            if number == 1:
                width = len(fields) - 1
                if width < 1:
                    raise LangdmlError(f"word vectors {path}, line 1: no numbers after the word; expected {expected}")
            if len(fields) - 1 < width:
                raise LangdmlError(
                    f"word vectors {path}, line {number}: {len(fields) - 1} numbers where line 1 has {width}"
                )
            word = " ".join(fields[: len(fields) - width])
            if word in wanted and word not in table:
                try:
                    table[word] = np.array(fields[-width:], dtype=np.float32)
                except ValueError:
                    raise LangdmlError(
                        f"word vectors {path}, line {number}: the row of {word!r} is not all numbers; "
                        f"expected {expected}"
                    ) from None
    if width == 0:
        raise LangdmlError(f"word vectors {path}: the file is empty; expected {expected}")
    return width, table


class BiGRUTower(nn.Module):
    """Word embeddings -> dropout -> bi-GRU (global: the final states' mean over directions); the set head
    attends over the embeddings and adds its slots to the global feature."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, dropout: float, head: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(word_dim, embed_dim, bidirectional=True, batch_first=True)
        self.head = head
        self.similarity = head.similarity

    def set_module(self) -> list[nn.Parameter]:
        return self.head.set_module()

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        words = self.dropout(self.embed(ids))
        lengths = (ids.shape[1] - mask.sum(dim=1)) if mask is not None else torch.full((len(ids),), ids.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.rnn(packed)  # 2 x B x D: the final state of each direction
        glob = self.dropout(last.mean(dim=0))
        return self.head.forward_tokens(words, mask, glob)


class _BiGRU(TowerKind):
    def cache(
        self,
        arg: str,
        texts: list[str],
        train: np.ndarray,
        max_tokens: int,
        device: Any,
        words: WordRules | None = None,
    ) -> CaptionCache:
        words = words or WordRules()
        vocab = build_vocabulary([t for t, keep in zip(texts, train.tolist(), strict=True) if keep], words)
        vectors = word_vectors(arg, vocab)
        found = int(np.isfinite(vectors[:, 0]).sum()) if vectors.shape[1] else 0
        details = {"vocab": vocab, "word_dim": vectors.shape[1], "words_with_vectors": found}
        if words.tokenizer != "regex":  # the query tokenizer must be the cache's (absent: regex, older caches)
            details["tokenizer"] = words.tokenizer
        tower = TextTower(f"bigru:{arg}", max_tokens, len(vocab), mask_id(vocab), details)
        return CaptionCache(self.tokenizer(tower, device)(texts), tower, {"word_vectors": vectors})

    def tokenizer(self, tower: TextTower, device: Any) -> Tokenizer:
        row = {w: i for i, w in enumerate(tower.details["vocab"])}
        rule = tower.details.get("tokenizer", "regex")
        return lambda texts: [word_ids(t, row, tower.max_tokens, rule) for t in texts]

    def build(self, tower: TextTower, head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        dim = int(tower.details["word_dim"])
        return BiGRUTower(len(tower.details["vocab"]), dim, embed_dim, dropout, head(dim, project=False))

    def initialise(self, module: nn.Module, tower: TextTower, arrays: dict[str, np.ndarray]) -> None:
        vectors = torch.from_numpy(np.asarray(arrays["word_vectors"], dtype=np.float32))
        found = torch.isfinite(vectors).all(dim=1)
        with torch.no_grad():
            module.embed.weight[found] = vectors[found]


TEXT_TOWERS.register("bigru")(_BiGRU())
