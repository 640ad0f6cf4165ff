"""The words of a caption and the vocabulary of a word-embedding text tower (``bigru``).

Two tokenizers: ``regex`` (lower-cased letters and digits, inner ' and - kept, punctuation dropped) and
``nltk``, the official one (kdwonn/DivE ``data.py``: ``nltk.tokenize.word_tokenize(caption.lower())``,
punctuation kept as tokens: ``.`` ``,`` ``'s`` ``n't``). Ours runs nltk's word tokenizer on the whole caption
(``preserve_line``), which needs no downloaded data; the official first splits sentences with punkt, so a
caption of two sentences keeps the first one's final period on its last word here ("play." vs "play" ".").

Two rules for the vocabulary built from the training captions (``imagetext.features.vocabulary``):
- ``ranked``: ``<pad> <start> <end> <unk> <mask>``, then every word seen ``min_word_count`` times or more, by
  falling count (ties alphabetical);
- ``official`` (DivE ``vocab.py``, ``build_vocab``): ``<pad> <start> <end> <unk>``, then the words seen
  ``min_word_count`` (``--threshold``) times or more in first-seen order. It has no ``<mask>`` row, so the
  caption drop's "mask" is ``<unk>``, as the official ``vocab('<mask>')`` returns it. Words below the threshold
  are ``<unk>`` in training, so that row trains.
A vocabulary file (``imagetext.features.vocabulary_file``) replaces the built one: the official
``vocab/<data>_vocab.pkl`` (read without running any pickled code) or a JSON ``{"word2idx": ...}``.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import LangdmlError

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")  # rows 0-4 of a ranked vocabulary
PAD, START, END, UNK, MASK = range(len(SPECIALS))
OFFICIAL_SPECIALS = SPECIALS[:4]  # vocab.py adds no <mask>
TOKENIZERS = ("regex", "nltk")
RULES = ("ranked", "official")
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass(frozen=True)
class WordRules:
    """How captions become words and the words a vocabulary (the ``imagetext.features`` keys of the same names)."""

    tokenizer: str = "regex"
    vocabulary: str = "ranked"
    min_word_count: int = 1
    vocabulary_file: str | None = None


def caption_words(text: str, tokenizer: str = "regex") -> list[str]:
    """The lower-cased words of ``text`` by ``tokenizer`` (the module docstring)."""
    if tokenizer == "nltk":
        from nltk.tokenize import word_tokenize

        return word_tokenize(text.lower(), preserve_line=True)
    if tokenizer != "regex":
        raise LangdmlError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    return _WORD.findall(text.lower())


def build_vocabulary(texts: list[str], rules: WordRules = WordRules()) -> list[str]:
    """The vocabulary of ``texts`` by ``rules`` (row i is word i), or the vocabulary file's."""
    if rules.vocabulary_file:
        return read_vocabulary_file(Path(rules.vocabulary_file))
    counts = Counter(w for t in texts for w in caption_words(t, rules.tokenizer))  # first-seen order kept
    kept = [w for w, n in counts.items() if n >= rules.min_word_count]
    if rules.vocabulary == "official":
        return [*OFFICIAL_SPECIALS, *(w for w in kept if w not in OFFICIAL_SPECIALS)]
    if rules.vocabulary != "ranked":
        raise LangdmlError(f"vocabulary must be one of {', '.join(RULES)}, got {rules.vocabulary!r}")
    return [*SPECIALS, *sorted((w for w in kept if w not in SPECIALS), key=lambda w: (-counts[w], w))]


def mask_id(vocabulary: list[str]) -> int:
    """The row caption drop masks with: ``<mask>``, or ``<unk>`` where the vocabulary has none (official)."""
    return vocabulary.index("<mask>") if "<mask>" in vocabulary else UNK


def word_ids(text: str, row: dict[str, int], max_tokens: int, tokenizer: str = "regex") -> np.ndarray:
    """``<start>`` + the words' rows (``<unk>`` for unknown ones) + ``<end>``, at most ``max_tokens``."""
    words = [row.get(w, UNK) for w in caption_words(text, tokenizer)][: max(0, max_tokens - 2)]
    return np.array([START, *words, END], dtype=np.int32)


class _Vocabulary:
    """What an official ``Vocabulary`` pickle holds (``word2idx``, ``idx2word``, ``idx``); no method runs."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _VocabularyUnpickler(pickle.Unpickler):
    """Builds dicts, lists and strings and the one class a vocabulary pickle names; refuses every other global,
    so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> type:
        if name == "Vocabulary":
            return _Vocabulary
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a vocabulary")


def read_vocabulary_file(path: Path) -> list[str]:
    """The words of a vocabulary file by row: DivE's ``vocab/*.pkl`` or JSON with ``word2idx``. Rows 0-3 must be
    ``<pad> <start> <end> <unk>`` and the rows 0..V-1 each one word; anything else is one line."""
    hint = "expected DivE's vocab/<data>_vocab.pkl or a JSON object with word2idx"
    if not path.is_file():
        raise LangdmlError(f"vocabulary file {path} not found; {hint} (docs/dive.md)")
    raw = path.read_bytes()
    try:
        if path.suffix == ".json":
            word2idx = json.loads(raw)["word2idx"]
        else:
            word2idx = _VocabularyUnpickler(io.BytesIO(raw)).load().word2idx
        rows = {int(i): str(w) for w, i in word2idx.items()}
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise LangdmlError(f"vocabulary file {path} is unreadable ({err}); {hint}") from None
    words = [rows.get(i) for i in range(len(rows))]
    if None in words or tuple(words[:4]) != OFFICIAL_SPECIALS:
        raise LangdmlError(f"vocabulary file {path}: rows must run 0..{len(rows) - 1} from <pad> <start> <end> <unk>")
    return words  # type: ignore[return-value]
