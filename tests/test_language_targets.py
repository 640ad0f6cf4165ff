"""Per-batch ELG/PLG similarities against explicit C x C references; controls; cache errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_training import CLASS_IDS, CLASS_NAMES, write_class_embeddings, write_pseudolabels

from stages.core.errors import LangdmlError
from stages.core.language.targets import (
    GUIDANCES,
    ConstantTarget,
    EmbeddingTarget,
    LanguageSources,
    build_language_targets,
    cache_files,
    mean_offdiagonal_cosine,
)

torch.set_num_threads(1)
BATCH_IDS = [6, 0, 0, 4, 2, 6]  # original ids, repeated classes
DENSE = {c: i for i, c in enumerate(CLASS_IDS)}


def sources(tmp_path: Path, class_ids=CLASS_IDS, seed: int = 0, names=CLASS_NAMES) -> LanguageSources:
    return LanguageSources(
        np.array(class_ids),
        tmp_path / "language" / "class_embeddings.parquet",
        tmp_path / "pseudolabels" / "pseudolabels.parquet",
        seed,
        names,
    )


def dense(ids) -> torch.Tensor:
    return torch.tensor([DENSE[c] for c in ids])


def test_elg_batch_similarity_equals_explicit_class_matrix(tmp_path: Path) -> None:
    src = sources(tmp_path)
    emb = write_class_embeddings(src.class_embeddings)
    (target,) = build_language_targets("elg", 1.0, src)
    full = emb @ emb.T  # the C x C matrix we never build in training
    expected = np.array([[full[DENSE[a], DENSE[b]] for b in BATCH_IDS] for a in BATCH_IDS])
    np.testing.assert_allclose(target(dense(BATCH_IDS)).numpy(), expected, atol=1e-6)


def test_plg_is_the_mean_over_ranks_of_rankwise_cosines(tmp_path: Path) -> None:
    src = sources(tmp_path)
    emb = write_pseudolabels(src.pseudolabels, k=3)  # k x C x D
    (target,) = build_language_targets("plg", 1.0, src)
    expected = np.zeros((len(BATCH_IDS), len(BATCH_IDS)))
    for i, a in enumerate(BATCH_IDS):
        for j, b in enumerate(BATCH_IDS):
            expected[i, j] = np.mean([emb[r, DENSE[a]] @ emb[r, DENSE[b]] for r in range(3)])
    np.testing.assert_allclose(target(dense(BATCH_IDS)).numpy(), expected, atol=1e-6)


def test_only_training_classes_are_kept_in_dense_order(tmp_path: Path) -> None:
    src = sources(tmp_path, class_ids=(2, 6))  # the cache also holds 0 and 4 (e.g. test classes)
    emb = write_class_embeddings(src.class_embeddings)
    (target,) = build_language_targets("elg", 1.0, src)
    np.testing.assert_allclose(target.embeddings[0].numpy(), emb[[1, 3]], atol=1e-6)


def test_both_gives_elg_and_plg(tmp_path: Path) -> None:
    src = sources(tmp_path)
    write_class_embeddings(src.class_embeddings)
    write_pseudolabels(src.pseudolabels)
    elg, plg = build_language_targets("both", 1.0, src)
    assert elg.embeddings.shape[0] == 1 and plg.embeddings.shape[0] == 3


def test_shuffled_permutes_class_assignment_reproducibly(tmp_path: Path) -> None:
    src = sources(tmp_path, seed=3)
    emb = write_class_embeddings(src.class_embeddings)
    (a,) = build_language_targets("shuffled", 1.0, src)
    (b,) = build_language_targets("shuffled", 1.0, src)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    rows = a.embeddings[0].numpy()
    perm = [int(np.argmax(emb @ r)) for r in rows]
    assert sorted(perm) == list(range(len(CLASS_IDS))) and perm != list(range(len(CLASS_IDS)))
    others = {
        tuple(
            int(np.argmax(emb @ r))
            for r in build_language_targets("shuffled", 1.0, sources(tmp_path, seed=s))[0].embeddings[0].numpy()
        )
        for s in range(6)
    }
    assert len(others) > 1  # the permutation depends on the seed


def test_uniform_is_the_mean_offdiagonal_cosine(tmp_path: Path) -> None:
    src = sources(tmp_path)
    emb = write_class_embeddings(src.class_embeddings)
    (target,) = build_language_targets("uniform", 1.0, src)
    full = emb @ emb.T
    expected = full[~np.eye(len(emb), dtype=bool)].mean()
    assert isinstance(target, ConstantTarget)
    assert target.value == pytest.approx(expected, abs=1e-6)
    sim = target(dense(BATCH_IDS))
    assert sim.shape == (6, 6) and torch.all(sim == sim[0, 0])
    assert mean_offdiagonal_cosine(torch.tensor(emb)) == pytest.approx(expected, abs=1e-6)


def test_none_and_omega_zero_read_no_cache(tmp_path: Path) -> None:
    src = sources(tmp_path)  # nothing written: any read would fail
    assert build_language_targets("none", 1.0, src) == []
    for guidance in GUIDANCES.names():
        assert build_language_targets(guidance, 0.0, src) == []
        assert cache_files(guidance, 0.0, src) == []
    assert cache_files("both", 1.0, src) == [src.class_embeddings, src.pseudolabels]


@pytest.mark.parametrize(("guidance", "stage"), [("elg", "embed-text"), ("plg", "pseudo-labels")])
def test_missing_cache_names_the_stage_to_run(tmp_path: Path, guidance: str, stage: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"run `langdml {stage}`"):
        build_language_targets(guidance, 1.0, sources(tmp_path))


def test_stale_caches_are_errors(tmp_path: Path) -> None:
    src = sources(tmp_path, class_ids=(0, 2, 4, 6, 8), names={**CLASS_NAMES, 8: "ship"})
    write_class_embeddings(src.class_embeddings)
    write_pseudolabels(src.pseudolabels)
    with pytest.raises(LangdmlError, match=r"stale: training class\(es\) \[8\]"):
        build_language_targets("elg", 1.0, src)
    with pytest.raises(LangdmlError, match=r"stale: .*\[8\].*pseudo-labels"):
        build_language_targets("plg", 1.0, src)
    renamed = sources(tmp_path, names={**CLASS_NAMES, 2: "wolf"})
    with pytest.raises(LangdmlError, match="class 2 is 'dog' there but 'wolf'"):
        build_language_targets("elg", 1.0, renamed)


def test_targets_follow_labels_device_and_embedding_target_accepts_k_slices() -> None:
    e = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    t = EmbeddingTarget(e)
    labels = torch.tensor([0, 2, 2])
    ref = sum(e[r][labels] @ e[r][labels].T for r in range(2)) / 2
    torch.testing.assert_close(t(labels), ref)
