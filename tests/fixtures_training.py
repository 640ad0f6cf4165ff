"""Tiny stand-ins for training tests: coloured-noise images, language caches, a fast config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from stages.core.config import TrainConfig, parse_params
from stages.core.dml.objective import TrainPaths
from stages.core.tables import embedding_array, embedding_type, write_parquet

# Original class ids are sparse on purpose: training must densify them.
CLASS_IDS = (0, 2, 4, 6)
CLASS_NAMES = {0: "cat", 2: "dog", 4: "car", 6: "truck"}

if TYPE_CHECKING:
    from stages.core.imagetext.towers import TextTower


class TinyImages(Dataset):
    """Per class a base colour plus noise, 16x16 RGB; ``labels`` are the original ids."""

    def __init__(self, transform: Any, per_class: int = 6, class_ids: tuple[int, ...] = CLASS_IDS) -> None:
        rng = np.random.default_rng(0)
        self.transform = transform
        self.images: list[Image.Image] = []
        labels = []
        for c in class_ids:
            base = rng.integers(0, 256, size=3)
            for _ in range(per_class):
                pix = np.clip(base + rng.normal(0, 30, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                self.images.append(Image.fromarray(pix, "RGB"))
                labels.append(c)
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    m = rng.normal(size=(n, d)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def write_class_embeddings(path: Path, class_ids=CLASS_IDS, dim: int = 8, seed: int = 1, names=None) -> np.ndarray:
    names = names or CLASS_NAMES
    emb = unit_rows(np.random.default_rng(seed), len(class_ids), dim)
    table = pa.table(
        {
            "class_id": pa.array(list(class_ids), pa.int64()),
            "class_name": [names[c] for c in class_ids],
            "prompt": [f"a photo of a {names[c]}" for c in class_ids],
            "embedding": embedding_array(emb),
        }
    )
    schema = pa.schema(
        [
            ("class_id", pa.int64()),
            ("class_name", pa.string()),
            ("prompt", pa.string()),
            ("embedding", embedding_type(dim)),
        ]
    )
    made_with = parse_params({}).class_embeddings_params()  # the default text params, as embed-text records them
    write_parquet(path, table, schema, {"encoder": "test", "dim": dim, "normalized": True, "params": made_with})
    return emb


def write_pseudolabels(path: Path, class_ids=CLASS_IDS, k: int = 3, dim: int = 8, seed: int = 2) -> np.ndarray:
    """Returns the k x C x D embeddings (rank-major) that were written."""
    emb = unit_rows(np.random.default_rng(seed), k * len(class_ids), dim).reshape(len(class_ids), k, dim)
    table = pa.table(
        {
            "class_id": pa.array(np.repeat(class_ids, k), pa.int64()),
            "rank": pa.array(np.tile(np.arange(k), len(class_ids)), pa.int32()),
            "imagenet_index": pa.array(np.arange(k * len(class_ids)), pa.int32()),
            "imagenet_name": [f"n{i}" for i in range(k * len(class_ids))],
            "score": pa.array(np.ones(k * len(class_ids)), pa.float32()),
            "embedding": embedding_array(emb.reshape(-1, dim)),
        }
    )
    schema = pa.schema(
        [
            ("class_id", pa.int64()),
            ("rank", pa.int32()),
            ("imagenet_index", pa.int32()),
            ("imagenet_name", pa.string()),
            ("score", pa.float32()),
            ("embedding", embedding_type(dim)),
        ]
    )
    write_parquet(path, table, schema, {"k": k, "dim": dim, "params": parse_params({}).pseudolabels_params()})
    return emb.transpose(1, 0, 2)


def tiny_params(**overrides: Any) -> TrainConfig:
    """A training config that trains in about a second: tiny timm CNN, 32 px, 3 batches of 8 per epoch."""
    raw: dict[str, Any] = {
        "seed": 0,
        "omega": 1.0,
        "model": {"backbone": "timm:test_resnet", "pretrained": False, "embed_dim": 16, "image_size": 32},
        "language": {"guidance": "elg"},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "samples_per_class": 2,
            "lr": 1e-3,
            "num_workers": 0,
            "device": "cpu",
            "log_every": 2,
            "amp": False,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_params(raw).training


def train_paths(root: Path) -> TrainPaths:
    return TrainPaths(
        checkpoint=root / "checkpoint" / "last.pt",
        model_dir=root / "model",
        log_dir=root / "train",
        class_embeddings=root / "language" / "class_embeddings.parquet",
        pseudolabels=root / "pseudolabels" / "pseudolabels.parquet",
    )


def frozen_tower(channels: int, encoder: str = "sentence-transformers:all-MiniLM-L6-v2") -> TextTower:
    """A frozen text tower over ``channels``-wide cached token features (what ``text_tower.json`` says)."""
    from stages.core.imagetext.towers import TextTower

    return TextTower(f"frozen:{encoder}", 32, details={"channels": channels})


def tiny_bert(directory: Path) -> Path:
    """A 1-layer, 16-wide BERT and its WordPiece tokenizer saved in ``directory`` (the hub is not reachable)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "sparrow", "truck"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).eval().save_pretrained(directory)
    return directory
