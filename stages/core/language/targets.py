"""Per-batch language similarities from the cached embeddings, without a C x C matrix.

SOP has 11,318 training classes, so a dense class-by-class similarity would be 0.5 GB; instead
the C x D (ELG) or k x C x D (PLG) normalised embeddings live on the device in dense-label order
and each batch computes ``E[labels] @ E[labels].T`` (B x B). Each guidance mode is a registered
builder returning the targets whose matching losses are averaged (``both`` has two).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.artifacts import check_provenance, read_class_embeddings, read_pseudolabels
from stages.core.errors import LangdmlError
from stages.core.model.similarity import Similarity
from stages.core.registry import Registry
from stages.core.tables import embedding_matrix

log = logging.getLogger(__name__)


class EmbeddingTarget:
    """Cosine similarities of class embeddings ``C x D``, or over ``k x C x D`` (PLG) either the rank-wise
    mean (the paper: the j-th name of one class meets only the j-th name of another) or, with
    ``set_similarity``, a set similarity of the k names of each class (every name meets every name)."""

    def __init__(self, embeddings: torch.Tensor, set_similarity: Similarity | None = None) -> None:
        e = embeddings if embeddings.ndim == 3 else embeddings.unsqueeze(0)
        self.embeddings = F.normalize(e.float(), dim=-1)
        self.set_similarity = set_similarity

    def to(self, device: torch.device | str) -> EmbeddingTarget:
        self.embeddings = self.embeddings.to(device)
        return self

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        """B x B similarity for dense labels."""
        e = self.embeddings[:, labels]  # k x B x D
        if self.set_similarity is not None:
            sets = e.transpose(0, 1)  # B x k x D
            return self.set_similarity(sets, sets)
        return torch.bmm(e, e.transpose(1, 2)).mean(dim=0)


class ConstantTarget:
    """The same similarity for every pair: only the KL regulariser's effect remains (a control)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def to(self, device: torch.device | str) -> ConstantTarget:
        return self

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        n = labels.shape[0]
        return torch.full((n, n), self.value, device=labels.device)


LanguageTarget = EmbeddingTarget | ConstantTarget


@dataclass(frozen=True)
class LanguageSources:
    """Everything a guidance builder may need; it reads only the cache it uses."""

    class_ids: np.ndarray  # sorted original training class ids; row i <-> dense label i
    class_embeddings: Path
    pseudolabels: Path
    seed: int
    class_names: dict[int, str] | None = None
    plg_set_similarity: Similarity | None = None  # PLG's k names as a set (None: the rank-wise mean)
    # The params each cache must have been made with (checked against its metadata); None: not checked.
    class_embeddings_params: dict[str, Any] | None = None
    pseudolabels_params: dict[str, Any] | None = None


GuidanceBuilder = Callable[[LanguageSources], list[LanguageTarget]]


@dataclass(frozen=True)
class Guidance:
    caches: tuple[str, ...]
    build: GuidanceBuilder


GUIDANCES: Registry[Guidance] = Registry("language guidance")


def _check_names(table_ids: np.ndarray, table_names: list[str], src: LanguageSources, path: Path, stage: str) -> None:
    if src.class_names is None:
        return
    cached = dict(zip(table_ids.tolist(), table_names, strict=True))
    wrong = [c for c in src.class_ids.tolist() if cached.get(c) != src.class_names.get(c)]
    if wrong:
        c = wrong[0]
        raise LangdmlError(
            f"{path} is stale: class {c} is {cached.get(c)!r} there but {src.class_names.get(c)!r} in the manifest "
            f"({len(wrong)} such); re-run `langdml {stage}`"
        )


def _rows(table_ids: np.ndarray, src: LanguageSources, path: Path, stage: str) -> np.ndarray:
    """Row of each training class (dense order) in a cache; a missing class means a stale cache."""
    order = {c: i for i, c in enumerate(table_ids.tolist())}
    missing = [c for c in src.class_ids.tolist() if c not in order]
    if missing:
        raise LangdmlError(
            f"{path} is stale: training class(es) {missing[:5]} ({len(missing)} in all) are missing; "
            f"re-run `langdml {stage}`"
        )
    return np.array([order[c] for c in src.class_ids.tolist()], dtype=np.int64)


def _embeddings(table, path: Path, stage: str) -> np.ndarray:
    matrix = embedding_matrix(table.column("embedding"))
    if not np.isfinite(matrix).all():
        raise LangdmlError(f"{path} holds non-finite embeddings; re-run `langdml {stage}`")
    return matrix


def elg_embeddings(src: LanguageSources) -> torch.Tensor:
    """C x D prompt embeddings of the training classes, in dense-label order."""
    path, stage = src.class_embeddings, "embed-text"
    table, meta = read_class_embeddings(path)
    if src.class_embeddings_params is not None:
        check_provenance(path, meta, src.class_embeddings_params, stage)
    ids = table.column("class_id").to_numpy()
    rows = _rows(ids, src, path, stage)
    _check_names(ids, table.column("class_name").to_pylist(), src, path, stage)
    return torch.from_numpy(_embeddings(table, path, stage)[rows])


def plg_embeddings(src: LanguageSources) -> torch.Tensor:
    """k x C x D pseudo-label embeddings (rank j of every training class in slice j)."""
    path, stage = src.pseudolabels, "pseudo-labels"
    table, meta = read_pseudolabels(path)
    if src.pseudolabels_params is not None:
        check_provenance(path, meta, src.pseudolabels_params, stage)
    ids = table.column("class_id").to_numpy()
    ranks = table.column("rank").to_numpy().astype(np.int64)
    matrix = _embeddings(table, path, stage)
    k = int(meta.get("k", ranks.max() + 1 if len(ranks) else 0))
    out = np.full((k, len(src.class_ids), matrix.shape[1]), np.nan, dtype=np.float32)
    dense = {c: i for i, c in enumerate(src.class_ids.tolist())}
    keep = np.array([c in dense for c in ids.tolist()], dtype=bool)
    r, d = ranks[keep], np.array([dense[c] for c in ids[keep].tolist()], dtype=np.int64)
    if len(r) and (r.min() < 0 or r.max() >= k):
        raise LangdmlError(f"{path} has ranks outside 0..{k - 1}; re-run `langdml {stage}`")
    out[r, d] = matrix[keep]
    incomplete = np.isnan(out).any(axis=(0, 2))
    if incomplete.any():
        bad = src.class_ids[incomplete].tolist()
        raise LangdmlError(
            f"{path} is stale: training class(es) {bad[:5]} ({len(bad)} in all) lack some of the k={k} "
            f"pseudo-labels; re-run `langdml {stage}`"
        )
    return torch.from_numpy(out)


def mean_offdiagonal_cosine(embeddings: torch.Tensor) -> float:
    """Mean cos(e_a, e_b) over a != b in O(C D): (|sum e|^2 - C) / (C (C - 1)) for unit rows."""
    e = F.normalize(embeddings.double(), dim=-1)
    c = e.shape[0]
    if c < 2:
        return 0.0
    s = e.sum(dim=0)
    return float((s @ s - c) / (c * (c - 1)))


def _guidance(name: str, *caches: str) -> Callable[[GuidanceBuilder], GuidanceBuilder]:
    """Register a builder together with the cache files (``LanguageSources`` fields) it reads."""

    def add(build: GuidanceBuilder) -> GuidanceBuilder:
        GUIDANCES.register(name)(Guidance(caches, build))
        return build

    return add


@_guidance("none")
def _none(src: LanguageSources) -> list[LanguageTarget]:
    return []


@_guidance("elg", "class_embeddings")
def _elg(src: LanguageSources) -> list[LanguageTarget]:
    return [EmbeddingTarget(elg_embeddings(src))]


@_guidance("plg", "pseudolabels")
def _plg(src: LanguageSources) -> list[LanguageTarget]:
    return [EmbeddingTarget(plg_embeddings(src), src.plg_set_similarity)]


@_guidance("both", "class_embeddings", "pseudolabels")
def _both(src: LanguageSources) -> list[LanguageTarget]:
    return [EmbeddingTarget(elg_embeddings(src)), EmbeddingTarget(plg_embeddings(src), src.plg_set_similarity)]


@_guidance("shuffled", "class_embeddings")
def _shuffled(src: LanguageSources) -> list[LanguageTarget]:
    """ELG with the class -> embedding assignment permuted (seeded): language structure without meaning."""
    e = elg_embeddings(src)
    perm = torch.randperm(e.shape[0], generator=torch.Generator().manual_seed(src.seed))
    return [EmbeddingTarget(e[perm])]


@_guidance("uniform", "class_embeddings")
def _uniform(src: LanguageSources) -> list[LanguageTarget]:
    """Every different-class pair gets the mean off-diagonal ELG cosine."""
    return [ConstantTarget(mean_offdiagonal_cosine(elg_embeddings(src)))]


def build_language_targets(
    guidance: str, omega: float, sources: LanguageSources, device: torch.device | str = "cpu"
) -> list[LanguageTarget]:
    """The targets to match; empty (and no cache read) when guidance is none or omega is 0."""
    g = GUIDANCES.get(guidance)
    if omega == 0:
        return []
    targets = g.build(sources)
    log.info("language guidance %s: %d target(s) over %d classes", guidance, len(targets), len(sources.class_ids))
    return [t.to(device) for t in targets]


def cache_files(guidance: str, omega: float, sources: LanguageSources) -> list[Path]:
    """The cache files a guidance reads (inputs of the training fingerprint); none when omega is 0."""
    g = GUIDANCES.get(guidance)
    return [] if omega == 0 else [getattr(sources, name) for name in g.caches]
