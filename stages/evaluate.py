"""Stage ``evaluate``: embed the test split with the trained model; metrics, embeddings and pictures.

Outputs (data/eval/): ``metrics.json`` (flat, with the control's numbers under ``pretrained/``),
``test_embeddings.parquet``, ``recall_at_k.csv`` (a DVC plot), ``gallery.png`` and
``similarity.png``. Everything is written only after the metrics are computed, the metrics file
last, so a failure never leaves a metrics file for a model that was not evaluated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stages import paths
from stages.core.errors import LangdmlError
from stages.core.io import (
    embedding_array,
    embedding_matrix,
    embedding_type,
    read_parquet,
    write_json,
    write_parquet,
    write_text,
)
from stages.params import Params

log = logging.getLogger(__name__)

GALLERY_NEIGHBOURS = 5
THUMBNAIL = 96  # pixels; gallery images are shown small
MAX_SIMILARITY_CLASSES = 100  # beyond this a class x class picture is unreadable: the first ones by id


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("index", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("class_name", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ]
    )


def read_pretrained_metrics(path: Path) -> dict[str, Any]:
    """The control's metrics, prefixed ``pretrained/`` for the flat metrics file."""
    if not path.is_file():
        raise LangdmlError(f"{path} does not exist (run `langdml evaluate-pretrained` first)")
    try:
        control = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LangdmlError(f"{path}: not valid JSON ({err}); re-run `langdml evaluate-pretrained`") from None
    if not isinstance(control, dict):
        raise LangdmlError(f"{path}: expected a JSON object; re-run `langdml evaluate-pretrained`")
    return {f"pretrained/{k}": v for k, v in control.items()}


def recall_csv(metrics: dict[str, Any], ks: list[int]) -> str:
    return "k,recall\n" + "".join(f"{k},{metrics[f'recall@{k}']:.6f}\n" for k in sorted(set(ks)))


def _thumbnail(image: Any) -> np.ndarray:
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def write_gallery(
    emb: np.ndarray, labels: np.ndarray, names: np.ndarray, table: pa.Table, root: Path, params: Params
) -> None:
    from stages.core.datasets import ImageDataset
    from stages.core.metrics import nearest_neighbours
    from stages.core.plots import GalleryRow, pick_gallery_queries, plot_gallery

    queries = pick_gallery_queries(labels, params.evaluate.gallery_queries, params.seed)
    neighbours = nearest_neighbours(emb, queries, GALLERY_NEIGHBOURS)
    images = ImageDataset(table, root, _thumbnail)
    rows = [
        GalleryRow(
            query=images[q][0],
            query_name=str(names[q]),
            neighbours=[images[j][0] for j in nb],
            neighbour_names=[str(names[j]) for j in nb],
            correct=list(labels[nb] == labels[q]),
        )
        for q, nb in zip(queries, neighbours, strict=True)
    ]
    plot_gallery(rows, paths.GALLERY)


def write_similarity(emb: np.ndarray, labels: np.ndarray) -> None:
    """Language vs learned image similarity of the test classes; skipped (logged) without the ELG cache."""
    from stages.core.metrics import class_centroids, cosine_similarity_matrix
    from stages.core.plots import plot_similarity

    classes = np.unique(labels)
    if len(classes) > MAX_SIMILARITY_CLASSES:
        log.info("similarity.png shows the first %d of %d test classes", MAX_SIMILARITY_CLASSES, len(classes))
        classes = classes[:MAX_SIMILARITY_CLASSES]
    skip = None
    if paths.CLASS_EMBEDDINGS.is_file():
        lang, _ = read_parquet(paths.CLASS_EMBEDDINGS, stage="embed-text")
        pos = {int(c): i for i, c in enumerate(lang.column("class_id").to_pylist())}
        missing = [int(c) for c in classes if int(c) not in pos]
        if missing:
            skip = f"{len(missing)} test classes (e.g. {missing[0]}) are not in {paths.CLASS_EMBEDDINGS}"
    else:
        skip = f"{paths.CLASS_EMBEDDINGS} is absent (run `langdml embed-text`)"
    if skip:
        log.info("similarity.png skipped: %s", skip)
        paths.SIMILARITY.unlink(missing_ok=True)  # never leave a picture of an older model beside new metrics
        return
    rows = [pos[int(c)] for c in classes]
    lang_sim = cosine_similarity_matrix(embedding_matrix(lang.column("embedding"))[rows])
    image_sim = cosine_similarity_matrix(class_centroids(emb, labels, classes))
    class_names = lang.column("class_name").to_pylist()
    plot_similarity(lang_sim, image_sim, [str(class_names[r]) for r in rows], paths.SIMILARITY)


def run(params: Params) -> None:
    from stages.core import vision
    from stages.core.datasets import ImageDataset, load_manifest
    from stages.core.embedding import embed_dataset
    from stages.core.metrics import format_metrics, retrieval_metrics
    from stages.core.runtime import resolve_device

    ev = params.evaluate
    control = read_pretrained_metrics(paths.PRETRAINED_METRICS)
    device = resolve_device(ev.device)
    model, model_params = vision.load_model(paths.MODEL, device)
    table, root = load_manifest(paths.TEST_MANIFEST)
    dataset = ImageDataset(table, root, vision.eval_transform(model_params.image_size, model.mean, model.std))
    log.info("embedding %d test images with the trained model", len(dataset))
    emb = embed_dataset(model, dataset, batch_size=ev.batch_size, num_workers=ev.num_workers, device=device)
    labels = dataset.labels
    metrics = retrieval_metrics(emb, labels, ev.ks, seed=params.seed, nmi=ev.nmi)

    names = np.asarray(table.column("class_name").to_pylist(), dtype=object)
    n, dim = emb.shape
    rows = pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(labels),
            "class_name": table.column("class_name"),
            "embedding": embedding_array(emb),
        }
    )
    meta = {
        "model": model_params.model_dump(),
        "dim": dim,
        "normalized": True,
        "manifest": str(paths.TEST_MANIFEST),
    }
    write_parquet(paths.TEST_EMBEDDINGS, rows, embeddings_schema(dim), meta)
    write_text(paths.RECALL_CSV, recall_csv(metrics, ev.ks))
    write_gallery(emb, labels, names, table, root, params)
    write_similarity(emb, labels)
    write_json(paths.METRICS, {**metrics, **control})
    log.info("metrics: %s", format_metrics(metrics))
