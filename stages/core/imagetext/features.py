"""The image-text features: frozen token features of every image file and what the text tower needs of every
caption, stored ragged in one folder (``data/imagetext/features/``; :mod:`stages.core.imagetext.tokens`).

Images: the backbone's last feature map, one token per grid cell (``image_size / 32`` a side), or the rows of
precomputed region features (``file.npy#row``). Captions, by ``text_tower``: a frozen encoder's token
features (special tokens included, at most ``max_tokens``), or the token ids of a trainable tower (with
``text_tower.json``: its :class:`TextTower`, and for ``bigru`` the initial word vectors, ``word_vectors.npy``).
Features are float16 ``.npy`` files (ids int32) stored ragged (all tokens one after another, T x C, plus
N + 1 offsets), so nothing is padded on disk; NumPy memory-maps them at training time, so a COCO-sized cache
streams from disk instead of filling memory. COCO's 123k images at a 7 x 7 grid of ResNet-50 (2,048 channels)
would take 123k x 49 x 2048 x 2 B = 24.7 GB; the precomp layout's 36 regions, 18.2 GB. Written into a
temporary folder and swapped in whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from stages.core.config import ImageTextFeatureParams
from stages.core.data.datasets.captions import FEATURE_ROW, image_manifest, is_precomputed
from stages.core.errors import LangdmlError
from stages.core.imagetext.tokens import TOWER_INFO, TokenSets, ragged_token_sets, save_token_sets
from stages.core.imagetext.towers import tower_kind
from stages.core.imagetext.vocabulary import WordRules
from stages.core.io import load_npy, replace_directory, save_npy, staging_directory, write_json

log = logging.getLogger(__name__)


def image_tokens(f: ImageTextFeatureParams, images: pa.Table, root: str) -> np.ndarray:
    """N x cells x C float16: the frozen backbone's last feature map of every image file, through the one
    inference loop (:func:`stages.core.evaluation.embedding.embed_dataset`, raw outputs)."""
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import eval_transform
    from stages.core.evaluation.embedding import embed_dataset
    from stages.core.model.backbones import create_backbone
    from stages.core.runtime import resolve_device

    device = resolve_device(f.device)
    backbone = create_backbone(f.backbone, pretrained=True)
    net = backbone.module.to(device).eval()
    dataset = ImageDataset(image_manifest(images), root, eval_transform(f.image_size, backbone.mean, backbone.std))
    return embed_dataset(
        lambda x: net(x).flatten(2).transpose(1, 2),
        dataset,
        batch_size=f.batch_size,
        num_workers=0,
        device=device,
        normalize=False,
        dtype=np.float16,
    )


def save_precomputed_tokens(images: pa.Table, root: str, directory: Path, chunk: int = 1024) -> tuple[int, ...]:
    """The rows that ``file.npy#row`` paths name, from memory-mapped feature files, written as float16 image token
    sets into ``directory`` a chunk at a time: never the whole array in memory (COCO's 123k x 36 x 2048 regions are
    18.2 GB in float16); their shape. A row with NaN or inf (or values beyond float16) is one line naming it."""
    refs = [p.split(FEATURE_ROW) for p in images["path"].to_pylist()]
    hint = "the precomp features must be numeric N x regions x channels arrays"
    files = {name: load_npy(Path(root) / name, hint, mmap_mode="r") for name in {f for f, _ in refs}}
    regions, channels = next(iter(files.values())).shape[1:]
    shape = (len(refs), regions, channels)
    tokens = np.lib.format.open_memmap(
        directory / "image_tokens.npy", "w+", np.float16, (len(refs) * regions, channels)
    )
    bad: list[int] = []
    with tqdm(total=len(refs), desc="precomputed features", unit="image") as bar:
        for start in range(0, len(refs), chunk):
            part = refs[start : start + chunk]
            block = np.stack([files[name][int(row)] for name, row in part]).astype(np.float16)
            bad += (start + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))).tolist()
            tokens[start * regions : (start + len(part)) * regions] = block.reshape(-1, channels)
            bar.update(len(part))
    tokens.flush()
    del tokens
    if bad:
        name, row = refs[bad[0]]
        raise LangdmlError(
            f"precomp: {len(bad)} image(s) have NaN or inf in their region features (or values beyond float16), "
            f"e.g. row {row} of {name}; fix the feature file, then run `langdml imagetext-features` again"
        )
    save_npy(directory / "image_offsets.npy", np.arange(0, (len(refs) + 1) * regions, regions, dtype=np.int64))
    return shape


def fixed_token_sets(grid: np.ndarray) -> TokenSets:
    """N x cells x C (every image the same number of tokens) as ragged token sets, without a copy when it is
    float16 already."""
    n, cells, channels = grid.shape
    offsets = np.arange(0, (n + 1) * cells, cells, dtype=np.int64)
    return TokenSets(grid.reshape(n * cells, channels).astype(np.float16, copy=False), offsets)


def compute_features(f: ImageTextFeatureParams, images: pa.Table, captions: pa.Table, root: str, out: Path) -> None:
    """Both modalities' token sets, the text tower's description and arrays, and ``features.json`` into ``out``."""
    from stages.core.runtime import resolve_device

    kind, arg = tower_kind(f.text_tower)
    train = np.asarray(captions["split"].to_pylist()) == "train"
    words = WordRules(f.tokenizer, f.vocabulary, f.min_word_count, f.vocabulary_file)
    cache = kind.cache(arg, captions["text"].to_pylist(), train, f.max_tokens, resolve_device(f.device), words=words)
    texts = ragged_token_sets(cache.sets)
    with staging_directory(out) as staging:
        if is_precomputed(images):
            shape = save_precomputed_tokens(images, root, staging)
        else:
            grid = image_tokens(f, images, root)
            save_token_sets(staging, "image", fixed_token_sets(grid))
            shape = grid.shape
        save_token_sets(staging, "caption", texts)
        write_json(staging / TOWER_INFO, cache.tower.to_json())
        for name, array in cache.arrays.items():
            save_npy(staging / f"{name}.npy", array)
        write_json(
            staging / "features.json",
            {
                "imagetext.features": f.model_dump(exclude={"batch_size", "device"}),
                "image_tokens": list(shape),
                "caption_tokens": list(texts.tokens.shape),
                "captions": len(texts),
                "dtype": str(texts.tokens.dtype),
            },
        )
        replace_directory(staging, out)
    mb = (int(np.prod(shape)) * 2 + texts.tokens.nbytes) / 2**20
    what = f"{texts.tokens.dtype} {'token ids' if texts.channels == 0 else 'features'}"
    log.info("features: images %s, captions %s (%s, %.1f MB)", shape, texts.tokens.shape, what, mb)
    if "vocab" in cache.tower.details:
        found, total = cache.tower.details.get("words_with_vectors", 0), len(cache.tower.details["vocab"])
        log.info("%s: %d words in the training captions' vocabulary, %d with a vector", f.text_tower, total, found)
