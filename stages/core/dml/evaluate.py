"""Evaluate a trained DML model on the test split: metrics (beside the pretrained control's and the
per-epoch summary), the test embeddings and the pictures.

Set embeddings are ranked by the model's own similarity (smooth-Chamfer, exact through the certified
shortlist). Everything is written only after the metrics are computed, the metrics file last, so a failure
never leaves a metrics file for a model that was not evaluated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.config import EvaluateParams
from stages.core.errors import LangdmlError
from stages.core.io import file_digest, write_json, write_text
from stages.core.model.similarity import SimilaritySpec

log = logging.getLogger(__name__)

SLOT_IMAGES = 6  # test images shown in slots.png (the first gallery queries)


@dataclass(frozen=True)
class EvaluationPaths:
    """What the evaluation reads (``model``, ``test_manifest``, ``control``: the pretrained control's metrics,
    ``per_epoch``: the test metrics during training, ``class_embeddings``: the ELG cache) and writes."""

    model: Path
    test_manifest: Path
    control: Path
    per_epoch: Path
    class_embeddings: Path
    metrics: Path
    embeddings: Path
    recall_csv: Path
    gallery: Path
    slots: Path
    similarity: Path


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


def read_best_epoch(path: Path) -> dict[str, Any]:
    """``max_over_epochs/...`` (the official summary: each metric's maximum over the epochs) and
    ``best_epoch/...`` (every metric of the best recall@1 epoch) of the test metrics taken during training
    (``train.evaluate_every``); nothing when there are none."""
    from stages.core.evaluation.per_epoch import best_epoch, max_over_epochs

    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["epochs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LangdmlError(f"{path}: unreadable ({err}); re-run `langdml train`") from None
    return {**max_over_epochs(rows), **best_epoch(rows)}


def check_control(control: dict[str, Any], labels: Any, path: Path = Path("data/pretrained_eval/metrics.json")) -> None:
    """The control must be of this test split: the same number of test images and classes (run by hand after
    a change of ``dataset``, ``langdml evaluate`` would otherwise merge another dataset's control)."""
    images = control.get("pretrained/n_queries", 0) + control.get("pretrained/n_skipped_queries", 0)
    classes = control.get("pretrained/n_classes")
    n_classes = len(set(labels.tolist()))
    if images != len(labels) or classes != n_classes:
        raise LangdmlError(
            f"{path} is of another test split ({images} images, {classes} classes; this one has "
            f"{len(labels)} and {n_classes}); run `langdml evaluate-pretrained` (or `dvc repro`)"
        )


def recall_csv(metrics: dict[str, Any], ks: list[int]) -> str:
    return "k,recall\n" + "".join(f"{k},{metrics[f'recall@{k}']:.6f}\n" for k in sorted(set(ks)))


def similarity_picture(
    cache: Path,
    cache_params: dict[str, Any],
    emb: np.ndarray,
    labels: np.ndarray,
    similarity: SimilaritySpec,
    out: Path,
    seed: int,
) -> str | None:
    """similarity.png from the ELG ``cache`` (checked against ``cache_params``); why it was skipped (absent or
    stale cache, missing classes), or None. A skipped picture is removed: never one of an older model beside
    new metrics."""
    from stages.core.artifacts import check_provenance, read_class_embeddings
    from stages.core.evaluation import report
    from stages.core.tables import embedding_matrix

    skipped = None
    if not cache.is_file():
        skipped = f"{cache} is absent (run `langdml embed-text`)"
    else:
        lang, meta = read_class_embeddings(cache)
        try:
            check_provenance(cache, meta, cache_params, "embed-text")
            ids, vectors = lang.column("class_id").to_numpy(), embedding_matrix(lang.column("embedding"))
            language = (ids, vectors, lang.column("class_name").to_pylist())
            skipped = report.similarity_figure(similarity.single_vectors(emb), labels, language, out, seed=seed)
        except LangdmlError as err:
            skipped = str(err)
    if skipped:
        out.unlink(missing_ok=True)
    return skipped


def evaluate_trained(
    ev: EvaluateParams, seed: int, class_embeddings_params: dict[str, Any], p: EvaluationPaths
) -> dict[str, Any]:
    """Embed the test split with the trained model, compute and write everything; the metrics written."""
    import torch

    from stages.core.artifacts import load_manifest, write_test_embeddings
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import eval_geometry, eval_transform
    from stages.core.evaluation import report
    from stages.core.evaluation.embedding import embed_dataset
    from stages.core.evaluation.metrics import check_ks, retrieval_metrics
    from stages.core.evaluation.search import nearest_neighbours
    from stages.core.model import encoder
    from stages.core.model.saved import WEIGHTS_NAME
    from stages.core.runtime import resolve_device

    control = read_pretrained_metrics(p.control)
    device = resolve_device(ev.device)
    model, model_params = encoder.load_model(p.model, device)
    table, root = load_manifest(p.test_manifest)
    check_ks(ev.ks, table.num_rows - 1)  # before embedding, not after
    check_control(control, table.column("label").to_numpy(), p.control)
    dataset = ImageDataset(table, root, eval_transform(model_params.image_size, model.mean, model.std))
    log.info("embedding %d test images with the trained model", len(dataset))
    emb = embed_dataset(
        model, dataset, batch_size=ev.batch_size, num_workers=ev.num_workers, device=device, precision=ev.precision
    )
    labels = dataset.labels
    metrics = retrieval_metrics(
        emb,
        query_labels=labels,
        ks=ev.ks,
        seed=seed,
        nmi=ev.nmi,
        nmi_restarts=ev.nmi_restarts,
        f1=ev.f1,
        map_at_1000=ev.map_at_1000,
        similarity=model.similarity,
    )

    meta = {
        "model": model_params.model_dump(),
        "normalized": True,
        "manifest": str(p.test_manifest),
        # what the index stage checks before it reuses these rows instead of embedding the test split again
        "manifest_sha256": file_digest(p.test_manifest),
        "weights_sha256": file_digest(p.model / WEIGHTS_NAME),
        "precision": ev.precision if device.type == "cuda" else "float32",
    }
    write_test_embeddings(p.embeddings, labels, table.column("class_name"), emb, meta)
    write_text(p.recall_csv, recall_csv(metrics, ev.ks))
    names = table.column("class_name").to_pylist()
    images = ImageDataset(table, root, None)
    queries = report.gallery_figure(
        emb,
        labels,
        names,
        images,
        p.gallery,
        n_queries=ev.gallery_queries,
        seed=seed,
        neighbours=partial(nearest_neighbours, similarity=model.similarity),
    )
    shown = queries[:SLOT_IMAGES]
    with torch.inference_mode():
        maps, titles = model.spatial_maps(torch.stack([dataset[i][0] for i in shown]).to(device))
    crop = eval_geometry(model_params.image_size)  # the maps cover what the model saw
    thumbs = [report.thumbnail(crop(images[i][0])) for i in shown]
    report.plot_slots(thumbs, maps.cpu().numpy(), titles, [names[i] for i in shown], p.slots)
    skipped = similarity_picture(
        p.class_embeddings, class_embeddings_params, emb, labels, model.similarity, p.similarity, seed
    )
    if skipped:
        log.info("similarity.png skipped: %s", skipped)
    write_json(p.metrics, {**metrics, **read_best_epoch(p.per_epoch), **control})
    return metrics
