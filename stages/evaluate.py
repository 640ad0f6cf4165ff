"""Stage ``evaluate``: embed the test split with the trained model; metrics, embeddings and pictures.

Outputs (data/eval/): ``metrics.json`` (flat, with the control's numbers under ``pretrained/``),
``test_embeddings.parquet`` (N x D, or N x K x D for a set head), ``recall_at_k.csv`` (a DVC plot),
``gallery.png``, ``similarity.png`` and ``slots.png`` (each slot's attention over a few test images; for
the linear head, the feature-norm map). The work is :func:`stages.core.dml.evaluate.evaluate_trained`.
"""

from __future__ import annotations

import logging

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.dml.evaluate import EvaluationPaths, evaluate_trained
    from stages.core.evaluation.metrics import format_metrics

    where = EvaluationPaths(
        model=paths.MODEL,
        test_manifest=paths.TEST_MANIFEST,
        control=paths.PRETRAINED_METRICS,
        per_epoch=paths.TEST_PER_EPOCH,
        class_embeddings=paths.CLASS_EMBEDDINGS,
        metrics=paths.METRICS,
        embeddings=paths.TEST_EMBEDDINGS,
        recall_csv=paths.RECALL_CSV,
        gallery=paths.GALLERY,
        slots=paths.SLOTS,
        similarity=paths.SIMILARITY,
    )
    metrics = evaluate_trained(params.evaluate, params.seed, params.class_embeddings_params(), where)
    log.info("metrics: %s", format_metrics(metrics))
