"""Variable-length token sets (image regions or grid cells, caption tokens) stored ragged, and their files.

Written by ``xm_features`` and read by the image-text training and evaluation: this module imports no
model or loss, so the frozen feature stage depends on nothing that training changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.core.errors import LangdmlError


@dataclass
class TokenSets:
    """Variable-length token sets stored ragged: ``tokens`` T x C (all sets' tokens one after another,
    float16, memory-mapped from disk) and ``offsets`` (N + 1; set i is ``tokens[offsets[i]:offsets[i+1]]``);
    ``index`` selects the sets this view shows (a split) without copying. Nothing is padded on disk:
    captions vary from 3 to 30 tokens, and padding would store mostly zeros."""

    tokens: np.ndarray
    offsets: np.ndarray
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    @property
    def channels(self) -> int:
        return int(self.tokens.shape[1])

    def subset(self, mask: np.ndarray) -> TokenSets:
        rows = np.flatnonzero(mask)
        return TokenSets(self.tokens, self.offsets, rows if self.index is None else self.index[rows])

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (float32, B x L x C, zero-padded to the longest) and the mask (True at padding) of ``rows``."""
        real = np.asarray(rows) if self.index is None else self.index[rows]
        starts, ends = self.offsets[real], self.offsets[real + 1]
        lengths = ends - starts
        out = np.zeros((len(real), int(lengths.max()), self.channels), dtype=np.float32)
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            out[i, : b - a] = self.tokens[a:b]
        mask = torch.arange(out.shape[1])[None, :] >= torch.as_tensor(lengths)[:, None]
        return torch.from_numpy(out).to(device), mask.to(device)


def ragged_token_sets(sets: list[np.ndarray]) -> TokenSets:
    """Variable-length L_i x C arrays -> one float16 T x C array and the offsets; an empty set is an error."""
    if not sets:
        raise LangdmlError("no token sets to store")
    empty = [i for i, s in enumerate(sets) if len(s) == 0]
    if empty:
        raise LangdmlError(f"{len(empty)} input(s) have no tokens, e.g. row {empty[0]}")
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    return TokenSets(np.concatenate(sets).astype(np.float16), offsets)


def save_token_sets(directory: Path, name: str, sets: TokenSets) -> None:
    np.save(directory / f"{name}_tokens.npy", sets.tokens)
    np.save(directory / f"{name}_offsets.npy", sets.offsets)


def load_token_sets(directory: Path, name: str) -> TokenSets:
    """``<name>_tokens.npy`` memory-mapped and ``<name>_offsets.npy`` from the features folder."""
    try:
        tokens = np.load(directory / f"{name}_tokens.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}_offsets.npy")
    except FileNotFoundError:
        raise LangdmlError(f"{directory} lacks the {name} features; run `langdml xm-features`") from None
    except ValueError as err:
        raise LangdmlError(f"{directory}: unreadable {name} features ({err}); re-run `langdml xm-features`") from None
    if tokens.ndim != 2 or offsets.ndim != 1 or len(offsets) < 2 or offsets[-1] != len(tokens):
        raise LangdmlError(f"{directory}: {name} features are inconsistent; re-run `langdml xm-features`")
    return TokenSets(tokens, offsets)
