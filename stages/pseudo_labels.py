"""Stage pseudo_labels (PLG): each training class's top-k ImageNet names, embedded, computed once.

An ImageNet classifier runs over the training images (the first ``max_per_class`` of each class,
at ``image_size`` pixels, to bound the CPU time); its outputs are averaged per class and
the k highest-scoring ImageNet classes become that class's pseudo-labels, embedded as
``template.format(name)`` with the configured text encoder. Writes
data/pseudolabels/pseudolabels.parquet and a readable data/pseudolabels/pseudolabels.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from stages import paths
from stages.core.artifacts import manifest_class_names, write_pseudolabels
from stages.core.config import Params
from stages.core.errors import LangdmlError
from stages.core.io import embedding_array, write_text
from stages.core.language.prompts import clean_class_name, embed_names

log = logging.getLogger(__name__)


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


def run(params: Params) -> None:
    import torch

    from stages.core.artifacts import first_per_class, load_manifest
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

    cfg = params.pseudo_labels
    table, root = load_manifest(paths.TRAIN_MANIFEST)
    if table.num_rows == 0:
        raise LangdmlError(f"{paths.TRAIN_MANIFEST} has no images; check the dataset and re-run `langdml prepare`")
    class_names = manifest_class_names(table)
    n_total = table.num_rows
    table = table.take(first_per_class(table.column("label").to_pylist(), cfg.max_per_class))
    device = resolve_device(cfg.device)

    model, transform = create_classifier(cfg.classifier, device, cfg.image_size)
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
    averager = class_mean_outputs(
        model,
        ImageDataset(table, root, transform),
        averaging=cfg.averaging,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    class_ids, means = averager.result()
    counts = averager.counts
    log.info("images averaged per class: %s", ", ".join(f"{c}: {counts[int(c)]}" for c in class_ids))
    if means.shape[1] != N_IMAGENET:
        raise LangdmlError(f"classifier {cfg.classifier} gives {means.shape[1]} outputs, not ImageNet's {N_IMAGENET}")
    indices, scores = topk_per_class(means, cfg.k)

    imagenet_names = imagenet_class_names()
    unique = sorted({int(i) for i in indices.reshape(-1)})
    encoder = create_text_encoder(params.text.encoder, pooling=params.text.pooling, device=device)
    _, vectors, used = embed_names(
        encoder, [clean_class_name(imagenet_names[i]) for i in unique], [cfg.template], params.text.batch_size
    )
    out = pseudolabel_rows(class_ids, indices, scores, imagenet_names, dict(zip(unique, vectors, strict=True)))
    metadata = {
        "classifier": cfg.classifier,
        "k": cfg.k,
        "averaging": cfg.averaging,
        "encoder": params.text.encoder,
        "dim": encoder.dim,
        "template": used[0],
        "pooling": params.text.pooling,
        "normalized": True,
        "n_images": int(table.num_rows),
        "image_size": image_size,
        "max_per_class": cfg.max_per_class,
        "params": params.pseudolabels_params(),
    }
    header = [
        f"classifier `{cfg.classifier}` at {height}x{width} px, averaging `{cfg.averaging}`, k = {cfg.k}, "
        f"{table.num_rows} of {n_total} training images (max_per_class {cfg.max_per_class}), "
        f"{len(class_ids)} classes; "
        f"names embedded with `{params.text.encoder}`."
    ]
    report = markdown_report(
        out, class_names, cfg.k, header, "softmax probabilities" if cfg.averaging == "probs" else "logits"
    )
    write_pseudolabels(paths.PSEUDOLABELS_TABLE, out, encoder.dim, metadata)
    write_text(paths.PSEUDOLABELS_REPORT, report)
    log.info(
        "pseudo-labels for %d classes -> %s, %s",
        len(class_ids),
        paths.PSEUDOLABELS_TABLE,
        paths.PSEUDOLABELS_REPORT,
    )
