"""Adding a DML loss or a text tower is one new module in its package folder (docs/development.md).

Each test writes the module into a temporary folder that it adds to the package's ``__path__`` (so the
repository is never written), looks the new name up through params validation, and runs it through the
one training loop. The registry and ``sys.modules`` are restored afterwards.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures_training import CLASS_NAMES, TinyImages, tiny_params, train_paths, write_class_embeddings

from stages.core.errors import LangdmlError
from stages.core.registry import Registry

TOY_LOSS = '''
"""A toy loss: the mean similarity of different-class pairs minus that of same-class pairs."""
import torch

from stages.core.dml.losses import DMLLoss, SpecLoss, dml_loss
from stages.core.model.similarity import COSINE, SimilaritySpec


class Spread(SpecLoss):
    def __init__(self, similarity: SimilaritySpec, scale: float) -> None:
        super().__init__(similarity)
        self.scale = scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sims = self.similarity(embeddings, embeddings)
        same = labels[:, None] == labels[None, :]
        return self.scale * (sims[~same].mean() - sims[same].mean())


@dml_loss("toy_spread", by_spec=True)
def _spread(num_classes: int, embed_dim: int, scale: float = 1.0, similarity: SimilaritySpec = COSINE) -> DMLLoss:
    return DMLLoss(Spread(similarity, scale))
'''

TOY_TOWER = '''
"""A toy text tower: a bag of hashed words, embedded, under the set head."""
import zlib

import numpy as np
import torch
from torch import nn

from stages.core.imagetext.towers import TEXT_TOWERS, CaptionCache, TextTower, TowerKind


class Bag(nn.Module):
    def __init__(self, buckets: int, width: int, head: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(buckets, width)
        self.head = head
        self.similarity = head.similarity

    def set_module(self):
        return self.head.set_module()

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        return self.head.forward_tokens(self.embed(ids), mask)


class _Bag(TowerKind):
    def cache(self, arg, texts, train, max_tokens, device, words=None):
        tower = TextTower(f"toybag:{arg}", max_tokens, int(arg), 0, {"width": 8})
        return CaptionCache(self.tokenizer(tower, device)(texts), tower)

    def tokenizer(self, tower, device):
        def ids(texts):
            return [
                np.array([1 + zlib.crc32(w.encode()) % (tower.vocab_size - 1) for w in t.split()], dtype=np.int32)
                for t in texts
            ]

        return ids

    def build(self, tower, head, embed_dim, dropout):
        return Bag(tower.vocab_size, tower.details["width"], head(tower.details["width"]))


TEXT_TOWERS.register("toybag")(_Bag())
'''


def _plug_in(package: str, registry: Registry, name: str, source: str, folder: Path) -> Iterator[None]:
    """``source`` as module ``name`` of ``package``, from ``folder``; the package, registry and sys.modules
    as they were afterwards."""
    module = sys.modules[package]
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    saved = (list(module.__path__), dict(registry._items), set(registry._searched))
    module.__path__.append(str(folder))
    try:
        yield
    finally:
        module.__path__[:] = saved[0]
        registry._items, registry._searched = saved[1], saved[2]
        sys.modules.pop(f"{package}.{name}", None)


@pytest.fixture
def toy_loss(tmp_path: Path) -> Iterator[None]:
    from stages.core.dml.losses import DML_LOSSES

    yield from _plug_in("stages.core.dml.losses", DML_LOSSES, "toy_spread", TOY_LOSS, tmp_path / "losses")


@pytest.fixture
def toy_tower(tmp_path: Path) -> Iterator[None]:
    import stages.core.imagetext.towers  # noqa: F401  (the package whose path the fixture extends)
    from stages.core.imagetext.towers import TEXT_TOWERS

    yield from _plug_in("stages.core.imagetext.towers", TEXT_TOWERS, "toybag", TOY_TOWER, tmp_path / "towers")


def test_a_new_dml_loss_is_one_module_found_by_params_and_trained_by_the_loop(toy_loss: None, tmp_path: Path) -> None:
    from stages.core.data.train_images import DecodedImages
    from stages.core.dml.objective import train_dml

    params = tiny_params(train={"epochs": 1, "loss": "toy_spread"}, losses={"toy_spread": {"scale": 2.0}})
    paths = train_paths(tmp_path / "run")
    write_class_embeddings(paths.class_embeddings)
    result = train_dml(params, DecodedImages(TinyImages), paths, class_names=CLASS_NAMES)
    assert result.epochs_trained == 1 and np.isfinite(result.history[0]["loss/dml"])
    assert (paths.model_dir / "model.safetensors").is_file()
    with pytest.raises(LangdmlError, match=r"losses\.toy_spread\.margin: unknown keyword; allowed keys: scale"):
        tiny_params(train={"loss": "toy_spread"}, losses={"toy_spread": {"margin": 0.1}})


def test_a_new_text_tower_is_one_module_found_by_params_and_trained_by_the_loop(
    toy_tower: None, tmp_path: Path
) -> None:
    from stages.core.config.imagetext import ImageTextFeatureParams, ImageTextModelParams, ImageTextTrainParams
    from stages.core.imagetext.objective import ImageTextData, ImageTextPaths, train_imagetext
    from stages.core.imagetext.tokens import ragged_token_sets
    from stages.core.imagetext.towers import tower_kind

    assert ImageTextFeatureParams(text_tower="toybag:64").text_tower == "toybag:64"
    kind, arg = tower_kind("toybag:64")
    captions = [f"a photo of thing {i // 2} seen {i % 2}" for i in range(8)]  # 4 images x 2 captions
    cache = kind.cache(arg, captions, np.ones(8, bool), 16, "cpu")
    rng = np.random.default_rng(0)
    data = ImageTextData(
        images=ragged_token_sets([rng.normal(size=(3, 8)).astype(np.float32) for _ in range(4)]),
        image_ids=np.arange(4),
        captions=ragged_token_sets(cache.sets),
        caption_image_ids=np.repeat(np.arange(4), 2),
        tower=cache.tower,
    )
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)
    tp = ImageTextTrainParams(epochs=1, batch_size=4, device="cpu", caption_drop=0.2)
    paths = ImageTextPaths(tmp_path / "model", tmp_path / "ckpt" / "last.pt", tmp_path / "logs")
    result = train_imagetext(data, mp, tp, 0, paths, [])
    assert result.epochs_trained == 1 and np.isfinite(result.history[0]["loss/triplet"])
    assert (tmp_path / "model" / "model.safetensors").is_file()
