"""Stage ``evaluate``: embed the test split with the trained model; metrics, embeddings and pictures.

Outputs (data/eval/): ``metrics.json`` (flat, with the control's numbers under ``pretrained/``),
``test_embeddings.parquet`` (N x D, or N x K x D for a set head), ``recall_at_k.csv`` (a DVC plot),
``gallery.png``, ``similarity.png`` and ``slots.png`` (each slot's attention over a few test images; for
the linear head, the feature-norm map). Set embeddings are ranked by the model's own similarity
(smooth-Chamfer, exact through the certified shortlist). Everything is written only after the metrics
are computed, the metrics file last, so a failure never leaves a metrics file for a model that was not
evaluated.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from stages import paths
from stages.core.config import Params
from stages.core.errors import LangdmlError
from stages.core.io import write_json, write_text

log = logging.getLogger(__name__)

SLOT_IMAGES = 6  # test images shown in slots.png (the first gallery queries)


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
    """``best_epoch/...``: the official protocol's summary of the test metrics taken during training
    (``train.evaluate_every``); nothing when there are none."""
    from stages.core.evaluation.per_epoch import best_epoch

    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["epochs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LangdmlError(f"{path}: unreadable ({err}); re-run `langdml train`") from None
    return best_epoch(rows)


def check_control(control: dict[str, Any], labels: Any) -> None:
    """The control must be of this test split: the same number of test images and classes (run by hand after
    a change of ``dataset``, ``langdml evaluate`` would otherwise merge another dataset's control)."""
    images = control.get("pretrained/n_queries", 0) + control.get("pretrained/n_skipped_queries", 0)
    classes = control.get("pretrained/n_classes")
    n_classes = len(set(labels.tolist()))
    if images != len(labels) or classes != n_classes:
        raise LangdmlError(
            f"{paths.PRETRAINED_METRICS} is of another test split ({images} images, {classes} classes; this one has "
            f"{len(labels)} and {n_classes}); run `langdml evaluate-pretrained` (or `dvc repro`)"
        )


def recall_csv(metrics: dict[str, Any], ks: list[int]) -> str:
    return "k,recall\n" + "".join(f"{k},{metrics[f'recall@{k}']:.6f}\n" for k in sorted(set(ks)))


def similarity_picture(params: Params, emb: Any, labels: Any) -> str | None:
    """similarity.png from the ELG cache; why it was skipped (absent or stale cache, missing classes), or
    None. A skipped picture is removed: never one of an older model beside new metrics."""
    from stages.core.artifacts import check_provenance, read_class_embeddings
    from stages.core.evaluation import report
    from stages.core.io import embedding_matrix

    skipped = None
    if not paths.CLASS_EMBEDDINGS.is_file():
        skipped = f"{paths.CLASS_EMBEDDINGS} is absent (run `langdml embed-text`)"
    else:
        lang, meta = read_class_embeddings(paths.CLASS_EMBEDDINGS)
        try:
            check_provenance(paths.CLASS_EMBEDDINGS, meta, params.class_embeddings_params(), "embed-text")
            ids, vectors = lang.column("class_id").to_numpy(), embedding_matrix(lang.column("embedding"))
            language = (ids, vectors, lang.column("class_name").to_pylist())
            skipped = report.similarity_figure(emb, labels, language, paths.SIMILARITY, seed=params.seed)
        except LangdmlError as err:
            skipped = str(err)
    if skipped:
        paths.SIMILARITY.unlink(missing_ok=True)
    return skipped


def run(params: Params) -> None:
    import torch

    from stages.core.artifacts import load_manifest, write_test_embeddings
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import eval_geometry, eval_transform
    from stages.core.evaluation import report
    from stages.core.evaluation.embedding import embed_dataset
    from stages.core.evaluation.metrics import check_ks, format_metrics, retrieval_metrics
    from stages.core.evaluation.search import nearest_neighbours
    from stages.core.model import encoder
    from stages.core.runtime import resolve_device

    ev = params.evaluate
    control = read_pretrained_metrics(paths.PRETRAINED_METRICS)
    device = resolve_device(ev.device)
    model, model_params = encoder.load_model(paths.MODEL, device)
    table, root = load_manifest(paths.TEST_MANIFEST)
    check_ks(ev.ks, table.num_rows - 1)  # before embedding, not after
    check_control(control, table.column("label").to_numpy())
    dataset = ImageDataset(table, root, eval_transform(model_params.image_size, model.mean, model.std))
    log.info("embedding %d test images with the trained model", len(dataset))
    emb = embed_dataset(model, dataset, batch_size=ev.batch_size, num_workers=ev.num_workers, device=device)
    labels = dataset.labels
    metrics = retrieval_metrics(
        emb,
        query_labels=labels,
        ks=ev.ks,
        seed=params.seed,
        nmi=ev.nmi,
        nmi_restarts=ev.nmi_restarts,
        f1=ev.f1,
        map_at_1000=ev.map_at_1000,
        similarity=model.similarity,
    )

    meta = {"model": model_params.model_dump(), "normalized": True, "manifest": str(paths.TEST_MANIFEST)}
    write_test_embeddings(paths.TEST_EMBEDDINGS, labels, table.column("class_name"), emb, meta)
    write_text(paths.RECALL_CSV, recall_csv(metrics, ev.ks))
    names = table.column("class_name").to_pylist()
    images = ImageDataset(table, root, None)
    queries = report.gallery_figure(
        emb,
        labels,
        names,
        images,
        paths.GALLERY,
        n_queries=ev.gallery_queries,
        seed=params.seed,
        neighbours=partial(nearest_neighbours, similarity=model.similarity),
    )
    shown = queries[:SLOT_IMAGES]
    with torch.inference_mode():
        maps, titles = model.spatial_maps(torch.stack([dataset[i][0] for i in shown]).to(device))
    crop = eval_geometry(model_params.image_size)  # the maps cover what the model saw
    thumbs = [report.thumbnail(crop(images[i][0])) for i in shown]
    report.plot_slots(thumbs, maps.cpu().numpy(), titles, [names[i] for i in shown], paths.SLOTS)
    skipped = similarity_picture(params, emb, labels)
    if skipped:
        log.info("similarity.png skipped: %s", skipped)
    write_json(paths.METRICS, {**metrics, **read_best_epoch(paths.TEST_PER_EPOCH), **control})
    log.info("metrics: %s", format_metrics(metrics))
