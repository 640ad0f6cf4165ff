"""Variable-length token sets (image regions or grid cells, caption tokens) stored ragged, and their files.

A set holds either feature vectors (T x C float16: image tokens, a frozen text encoder's token features) or
token ids (T int32: the captions of a trainable text tower, which embeds them itself).

Written by ``imagetext_features`` and read by the image-text training and evaluation: this module imports no
model or loss, so the frozen feature stage depends on nothing that training changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core.errors import LangdmlError
from stages.core.imagetext.towers import TextTower
from stages.core.io import load_npy, save_npy

TOWER_INFO = "text_tower.json"  # what building the text tower needs (written beside the caption tokens)


@dataclass
class TokenSets:
    """Variable-length token sets stored ragged: ``tokens`` T x C (all sets' tokens one after another,
    float16, memory-mapped from disk) or T token ids (int32), and ``offsets`` (N + 1; set i is
    ``tokens[offsets[i]:offsets[i+1]]``);
    ``index`` selects the sets this view shows (a split) without copying. Nothing is padded on disk:
    captions vary from 3 to 30 tokens, and padding would store mostly zeros."""

    tokens: np.ndarray
    offsets: np.ndarray
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    @property
    def channels(self) -> int:
        """Feature channels; 0 for token ids."""
        return int(self.tokens.shape[1]) if self.tokens.ndim == 2 else 0

    def subset(self, mask: np.ndarray) -> TokenSets:
        rows = np.flatnonzero(mask)
        return TokenSets(self.tokens, self.offsets, rows if self.index is None else self.index[rows])

    def batch(
        self,
        rows: np.ndarray,
        device: torch.device,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (float32 B x L x C, or int64 ids B x L, zero-padded to the longest) and the mask (True at
        padding) of ``rows``; ``transform`` (an augmentation) is applied to each set first."""
        real = np.asarray(rows) if self.index is None else self.index[rows]
        sets = [
            self.tokens[a:b] for a, b in zip(self.offsets[real].tolist(), self.offsets[real + 1].tolist(), strict=True)
        ]
        if transform is not None:
            sets = [transform(np.asarray(x)) for x in sets]
        lengths = np.array([len(x) for x in sets])
        ids = self.tokens.ndim == 1
        shape = (len(sets), int(lengths.max())) if ids else (len(sets), int(lengths.max()), self.channels)
        out = np.zeros(shape, dtype=np.int64 if ids else np.float32)
        for i, x in enumerate(sets):
            out[i, : len(x)] = x
        mask = torch.arange(out.shape[1])[None, :] >= torch.as_tensor(lengths)[:, None]
        return torch.from_numpy(out).to(device), mask.to(device)


def ragged_token_sets(sets: list[np.ndarray]) -> TokenSets:
    """Variable-length L_i x C feature arrays (float16 on disk) or L_i token-id vectors (int32) -> one
    array and the offsets; an empty set is an error."""
    if not sets:
        raise LangdmlError("no token sets to store")
    empty = [i for i, s in enumerate(sets) if len(s) == 0]
    if empty:
        raise LangdmlError(f"{len(empty)} input(s) have no tokens, e.g. row {empty[0]}")
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    tokens = np.concatenate(sets)
    return TokenSets(tokens.astype(np.int32 if tokens.ndim == 1 else np.float16), offsets)


def save_token_sets(directory: Path, name: str, sets: TokenSets) -> None:
    save_npy(directory / f"{name}_tokens.npy", sets.tokens)
    save_npy(directory / f"{name}_offsets.npy", sets.offsets)


def load_token_sets(directory: Path, name: str) -> TokenSets:
    """``<name>_tokens.npy`` memory-mapped and ``<name>_offsets.npy`` from the features folder."""
    hint = "run `langdml imagetext-features` (or `dvc repro`)"
    if not all((directory / f"{name}_{part}.npy").is_file() for part in ("tokens", "offsets")):
        raise LangdmlError(f"{directory} lacks the {name} features; {hint}")
    tokens = load_npy(directory / f"{name}_tokens.npy", hint, mmap_mode="r")
    offsets = load_npy(directory / f"{name}_offsets.npy", hint)
    if tokens.ndim not in (1, 2) or offsets.ndim != 1 or len(offsets) < 2 or offsets[-1] != len(tokens):
        raise LangdmlError(f"{directory}: {name} features are inconsistent; re-run `langdml imagetext-features`")
    return TokenSets(tokens, offsets)


def load_tower_cache(directory: Path) -> tuple[TextTower, dict[str, np.ndarray]]:
    """The text tower's description (``text_tower.json``) and its extra arrays (every ``.npy`` but the token sets)."""
    path = directory / TOWER_INFO
    if not path.is_file():
        raise LangdmlError(f"{directory} lacks {TOWER_INFO}; re-run `langdml imagetext-features`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise LangdmlError(f"{path} is unreadable ({err}); re-run `langdml imagetext-features`") from None
    hint = "re-run `langdml imagetext-features` (or `dvc repro`)"
    arrays = {
        p.stem: load_npy(p, hint)
        for p in sorted(directory.glob("*.npy"))
        if not p.stem.endswith(("_tokens", "_offsets"))
    }
    try:
        return TextTower.from_json(info), arrays
    except (KeyError, TypeError, ValueError) as err:
        raise LangdmlError(f"{path} is incomplete ({err!r}); re-run `langdml imagetext-features`") from None
