"""The PLG pass: an ImageNet classifier over the training images, averaged per class; each class's top-k
ImageNet names, embedded by the text encoder, as a Parquet table with its metadata and a Markdown report.

The classifier sees the first ``max_per_class`` images of each class at ``image_size`` pixels (to bound the
CPU time); its outputs are averaged per class and the k highest-scoring ImageNet classes become that class's
pseudo-labels, embedded as ``template.format(name)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from stages.core.artifacts import manifest_class_names
from stages.core.config import PseudoLabelParams, TextParams
from stages.core.data.datasets.base import first_per_class
from stages.core.errors import LangdmlError
from stages.core.language.prompts import clean_class_name, embed_names
from stages.core.tables import embedding_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoLabels:
    table: pa.Table  # one row per (class, rank)
    dim: int  # the name embeddings' width
    metadata: dict[str, Any]
    report: str  # Markdown


def pseudolabel_rows(
    class_ids: np.ndarray,
    indices: np.ndarray,
    scores: np.ndarray,
    imagenet_names: Sequence[str],
    name_embeddings: dict[int, np.ndarray],
) -> pa.Table:
    """Long table, one row per (class, rank), classes ascending and rank 0 the best."""
    n_classes, k = indices.shape
    flat = indices.reshape(-1)
    return pa.table(
        {
            "class_id": pa.array(np.repeat(class_ids, k), pa.int64()),
            "rank": pa.array(np.tile(np.arange(k, dtype=np.int32), n_classes), pa.int32()),
            "imagenet_index": pa.array(flat.astype(np.int32), pa.int32()),
            "imagenet_name": pa.array([imagenet_names[i] for i in flat], pa.string()),
            "score": pa.array(scores.reshape(-1).astype(np.float32), pa.float32()),
            "embedding": embedding_array(np.stack([name_embeddings[int(i)] for i in flat])),
        }
    )


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell: pipes escaped, line breaks (which would end the row) as spaces."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown_report(
    table: pa.Table, class_names: dict[int, str], k: int, header: Sequence[str], score_label: str
) -> str:
    """A Markdown table: one line per class with its top-k ImageNet names and scores."""
    lines = ["# PLG pseudo-labels", "", *header, ""]
    lines.append("| class_id | class | " + " | ".join(f"top-{r + 1}" for r in range(k)) + " |")
    lines.append("|---:|---|" + "---|" * k)
    per_class = (
        pl.from_arrow(table.select(["class_id", "rank", "imagenet_name", "score"]))
        .sort("class_id", "rank")
        .group_by("class_id", maintain_order=True)
        .agg("imagenet_name", "score")
    )
    for cid, names, scores in per_class.iter_rows():
        cells = [f"{_cell(name)} ({score:.3f})" for name, score in zip(names, scores, strict=True)]
        lines.append(f"| {cid} | {_cell(class_names.get(cid, '?'))} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Scores are the class mean of the classifier's {score_label}.")
    return "\n".join(lines) + "\n"


def per_class_summary(counts: Sequence[int]) -> str:
    """One short line for any number of classes: ``3 classes, 1 image each`` or ``11318 classes, 2-12 images
    (median 5)``; the per-class counts are in pseudolabels.md's table, not the log."""
    low, high = min(counts), max(counts)
    if low == high:
        return f"{len(counts)} classes, {low} image{'s' if low != 1 else ''} each"
    return f"{len(counts)} classes, {low}-{high} images (median {int(np.median(counts))})"


def transform_changes(means: np.ndarray, other: np.ndarray, k: int) -> int:
    """How many classes (rows) have another set of top-``k`` ImageNet classes in ``other`` than in ``means``."""
    from stages.core.language.pseudo import topk_per_class

    first, second = topk_per_class(means, k)[0], topk_per_class(other, k)[0]
    return int(sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(first, second, strict=True)))


def compute_pseudolabels(
    manifest: pa.Table, root: Path, cfg: PseudoLabelParams, text: TextParams, params_record: dict[str, Any]
) -> PseudoLabels:
    """The PLG cache of the training ``manifest`` (images under ``root``); ``params_record`` (the params that
    decide the cache, by their dvc.yaml names) goes into its metadata, for the readers' provenance check."""
    import torch

    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.language.encoders import create_text_encoder
    from stages.core.language.imagenet import (
        N_IMAGENET,
        class_mean_outputs,
        create_classifier,
        imagenet_class_names,
        transform_output_size,
    )
    from stages.core.language.pseudo import topk_per_class
    from stages.core.runtime import resolve_device

    if manifest.num_rows == 0:
        raise LangdmlError("the training manifest has no images; check the dataset and re-run `langdml prepare`")
    class_names = manifest_class_names(manifest)
    n_total = manifest.num_rows
    table = manifest.take(first_per_class(manifest.column("label").to_pylist(), cfg.max_per_class))
    device = resolve_device(cfg.device)
    model, transform = create_classifier(cfg.classifier, device, cfg.image_size, cfg.transform)
    height, width = transform_output_size(transform)
    image_size = height if height == width else [height, width]
    log.info(
        "classifying %d of %d training images (max_per_class %s) at %dx%d px with %s",
        table.num_rows,
        n_total,
        cfg.max_per_class,
        height,
        width,
        cfg.classifier,
    )

    def class_means(classifier: Any, transform: Any) -> Any:
        return class_mean_outputs(
            classifier,
            ImageDataset(table, root, transform),
            averaging=cfg.averaging,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=device,
        )

    averager = class_means(model, transform)
    changed = None
    if cfg.compare_transforms:
        other = "official" if cfg.transform == "classifier" else "classifier"
        _, other_means = class_means(model, create_classifier(cfg.classifier, "cpu", cfg.image_size, other)[1]).result()
        changed = transform_changes(averager.result()[1], other_means, cfg.k)
        log.info(
            "%d of %d classes' top-%d names differ under the %s transform", changed, len(other_means), cfg.k, other
        )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    class_ids, means = averager.result()
    counts = averager.counts
    log.info("images averaged per class: %s", per_class_summary([counts[int(c)] for c in class_ids]))
    if means.shape[1] != N_IMAGENET:
        raise LangdmlError(f"classifier {cfg.classifier} gives {means.shape[1]} outputs, not ImageNet's {N_IMAGENET}")
    indices, scores = topk_per_class(means, cfg.k)

    imagenet_names = imagenet_class_names()
    unique = sorted({int(i) for i in indices.reshape(-1)})
    encoder = create_text_encoder(text.encoder, pooling=text.pooling, device=device)
    _, vectors, used = embed_names(
        encoder, [clean_class_name(imagenet_names[i]) for i in unique], [cfg.template], text.batch_size
    )
    out = pseudolabel_rows(class_ids, indices, scores, imagenet_names, dict(zip(unique, vectors, strict=True)))
    metadata = {
        "classifier": cfg.classifier,
        "k": cfg.k,
        "averaging": cfg.averaging,
        "encoder": text.encoder,
        "dim": encoder.dim,
        "template": used[0],
        "pooling": text.pooling,
        "normalized": True,
        "n_images": int(table.num_rows),
        "image_size": image_size,
        "max_per_class": cfg.max_per_class,
        "transform": cfg.transform,
        "params": params_record,
    }
    header = [
        f"classifier `{cfg.classifier}` at {height}x{width} px ({cfg.transform} transform), averaging "
        f"`{cfg.averaging}`, k = {cfg.k}, {table.num_rows} of {n_total} training images (max_per_class "
        f"{cfg.max_per_class}), {len(class_ids)} classes; names embedded with `{text.encoder}`."
    ]
    if changed is not None:
        metadata["classes_changed_by_transform"] = changed
        other = "official" if cfg.transform == "classifier" else "classifier"
        header.append(
            f"Under the {other} transform, {changed} of {len(class_ids)} classes get other top-{cfg.k} names."
        )
    report = markdown_report(
        out, class_names, cfg.k, header, "softmax probabilities" if cfg.averaging == "probs" else "logits"
    )
    return PseudoLabels(out, encoder.dim, metadata, report)
