"""Text towers of the image-text model, found by name (``crossmodal.features.text_tower``).

- ``frozen:<encoder>``: a frozen text encoder's token features (``frozen:sentence-transformers:...``,
  ``frozen:hf:...``), cached once by ``xm_features``; only the set head trains on them.
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

Each tower has a cache half (:meth:`TowerKind.cache`, run by ``xm_features``), a query half
(:meth:`TowerKind.tokenizer`: a caption -> what the cache would hold, for ``langdml search --text``) and a
module half (:meth:`TowerKind.build`, :meth:`TowerKind.initialise`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.registry import Registry, parse_spec

HeadFactory = Callable[..., nn.Module]  # (token channels, project=...) -> a set head
Tokenizer = Callable[[list[str]], list[np.ndarray]]

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")  # rows 0-4 of a bi-GRU vocabulary
PAD, START, END, UNK, MASK = range(len(SPECIALS))
HF_HINT = "text_tower bigru:glove:6B-50d and frozen:sentence-transformers:all-MiniLM-L6-v2 work offline"
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass
class CaptionCache:
    """What ``xm_features`` stores for the captions: one array per caption (L x C features or L ids), the
    JSON ``info`` building the tower needs (saved with the model too), and extra arrays (``<name>.npy``)."""

    sets: list[np.ndarray]
    info: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class TowerKind:
    """One family of text towers; ``arg`` is what follows ``family:`` in the spec."""

    def cache(self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any) -> CaptionCache:
        raise NotImplementedError

    def tokenizer(self, info: dict[str, Any], device: Any) -> Tokenizer:
        raise NotImplementedError

    def build(self, info: dict[str, Any], head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        raise NotImplementedError

    def initialise(self, tower: nn.Module, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Pretrained weights into a freshly built tower, before training (nothing by default)."""


TEXT_TOWERS: Registry[TowerKind] = Registry("text tower")


def tower_kind(spec: str) -> tuple[TowerKind, str]:
    family, arg = parse_spec(spec, kind="crossmodal.features.text_tower", require_arg=True)
    return TEXT_TOWERS.get(family), arg


class FrozenTower(nn.Module):
    """The set head over cached token features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.similarity = head.similarity

    def set_module(self) -> list[nn.Parameter]:
        return self.head.set_module()

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        return self.head.forward_tokens(tokens, mask)


class _Frozen(TowerKind):
    def cache(self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any) -> CaptionCache:
        sets = self.tokenizer({"tower": f"frozen:{arg}", "max_tokens": max_tokens}, device)(texts)
        return CaptionCache(sets, {"tower": f"frozen:{arg}", "max_tokens": max_tokens, "channels": sets[0].shape[1]})

    def tokenizer(self, info: dict[str, Any], device: Any) -> Tokenizer:
        from stages.core.language.encoders import create_text_encoder

        encoder = create_text_encoder(info["tower"].partition(":")[2], device=device)
        return lambda texts: encoder.tokens(texts, 64, info["max_tokens"])

    def build(self, info: dict[str, Any], head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        return FrozenTower(head(int(info["channels"])))


def caption_words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, inner ' and - kept), the bi-GRU's tokens."""
    return _WORD.findall(text.lower())


def build_vocabulary(texts: list[str]) -> list[str]:
    """The special rows, then every word of ``texts`` by falling count (ties alphabetical)."""
    counts = Counter(w for t in texts for w in caption_words(t))
    return [*SPECIALS, *sorted(counts, key=lambda w: (-counts[w], w))]


def word_ids(text: str, row: dict[str, int], max_tokens: int) -> np.ndarray:
    """``<start>`` + the words' rows (``<unk>`` for unknown ones) + ``<end>``, at most ``max_tokens``."""
    words = [row.get(w, UNK) for w in caption_words(text)][: max(0, max_tokens - 2)]
    return np.array([START, *words, END], dtype=np.int32)


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
    def cache(self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any) -> CaptionCache:
        vocab = build_vocabulary([t for t, keep in zip(texts, train.tolist(), strict=True) if keep])
        vectors = word_vectors(arg, vocab)
        found = int(np.isfinite(vectors[:, 0]).sum()) if vectors.shape[1] else 0
        info = {"tower": f"bigru:{arg}", "max_tokens": max_tokens, "vocab": vocab, "word_dim": vectors.shape[1]}
        info.update(words_with_vectors=found, mask_id=MASK, vocab_size=len(vocab))
        return CaptionCache(self.tokenizer(info, device)(texts), info, {"word_vectors": vectors})

    def tokenizer(self, info: dict[str, Any], device: Any) -> Tokenizer:
        row = {w: i for i, w in enumerate(info["vocab"])}
        return lambda texts: [word_ids(t, row, info["max_tokens"]) for t in texts]

    def build(self, info: dict[str, Any], head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        dim = int(info["word_dim"])
        return BiGRUTower(len(info["vocab"]), dim, embed_dim, dropout, head(dim, project=False))

    def initialise(self, tower: nn.Module, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        vectors = torch.from_numpy(np.asarray(arrays["word_vectors"], dtype=np.float32))
        found = torch.isfinite(vectors).all(dim=1)
        with torch.no_grad():
            tower.embed.weight[found] = vectors[found]


class HFTower(nn.Module):
    """A transformer's token states, projected to ``embed_dim``; the first token's state is the global
    feature (``txt_pooling cls``)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.linear = nn.Linear(encoder.config.hidden_size, embed_dim)
        self.head = head
        self.similarity = head.similarity

    def set_module(self) -> list[nn.Parameter]:
        return self.head.set_module()

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        attention = torch.ones_like(ids) if mask is None else (~mask).long()
        local = self.linear(self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state)
        return self.head.forward_tokens(local, mask, local[:, 0])


def _encoder(tok: Any, max_tokens: int) -> Tokenizer:
    """Captions -> a Hugging Face tokenizer's ids (special tokens included, at most ``max_tokens``)."""

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(row, dtype=np.int32) for row in tok(texts, truncation=True, max_length=max_tokens)["input_ids"]
        ]

    return encode


class _HF(TowerKind):
    @staticmethod
    def _load(name: str, load: Callable[[], Any]) -> Any:
        """``load()`` from a local folder, or from the hub's cache / the hub (one line when neither works)."""
        from stages.core.hub import load_cached_or_online, load_local

        what = f"text tower hf:{name}"
        return load_local(what, load) if Path(name).exists() else load_cached_or_online(what, load, HF_HINT)

    def _tokenizer(self, name: str) -> Any:
        from transformers import AutoTokenizer

        return self._load(name, lambda: AutoTokenizer.from_pretrained(name))

    def cache(self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any) -> CaptionCache:
        from transformers import AutoConfig

        tok = self._tokenizer(arg)
        config = self._load(arg, lambda: AutoConfig.from_pretrained(arg))
        info = {"tower": f"hf:{arg}", "max_tokens": max_tokens, "config": config.to_dict()}
        info["mask_id"], info["vocab_size"] = tok.mask_token_id, int(config.vocab_size)
        return CaptionCache(_encoder(tok, max_tokens)(texts), info)

    def tokenizer(self, info: dict[str, Any], device: Any) -> Tokenizer:
        return _encoder(self._tokenizer(info["tower"].partition(":")[2]), info["max_tokens"])

    def build(self, info: dict[str, Any], head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        config = dict(info["config"])
        config_obj = AutoConfig.for_model(config.pop("model_type"), **config)
        return HFTower(AutoModel.from_config(config_obj), embed_dim, head(embed_dim, project=False))

    def initialise(self, tower: nn.Module, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        from transformers import AutoModel

        name = info["tower"].partition(":")[2]
        tower.encoder.load_state_dict(self._load(name, lambda: AutoModel.from_pretrained(name)).state_dict())


TEXT_TOWERS.register("frozen")(_Frozen())
TEXT_TOWERS.register("bigru")(_BiGRU())
TEXT_TOWERS.register("hf")(_HF())


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
