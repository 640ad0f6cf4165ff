"""Stage ``evaluate-pretrained``: retrieval metrics of the untrained backbone's pooled features.

The control every trained model is compared with. It reads only the test manifest and the
backbone settings (no head, so ``embed_dim`` and training parameters do not matter), and the
seed, which only changes anything when ``model.pretrained`` is false.
"""

from __future__ import annotations

import logging

from stages import paths
from stages.core.config import Params
from stages.core.io import write_json

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.artifacts import load_manifest
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import eval_transform
    from stages.core.evaluation.embedding import embed_dataset
    from stages.core.evaluation.metrics import check_ks, format_metrics, retrieval_metrics
    from stages.core.model import encoder
    from stages.core.runtime import resolve_device, seed_everything

    seed_everything(params.seed)
    ev = params.evaluate
    table, root = load_manifest(paths.TEST_MANIFEST)
    check_ks(ev.ks, table.num_rows - 1)  # before embedding, not after
    device = resolve_device(ev.device)
    model = encoder.build_model(params.model)
    dataset = ImageDataset(table, root, eval_transform(params.model.image_size, model.mean, model.std))
    log.info(
        "embedding %d test images with the pretrained %s (pooled features)",
        len(dataset),
        params.model.backbone,
    )
    options = {"batch_size": ev.batch_size, "num_workers": ev.num_workers, "precision": ev.precision}
    emb = embed_dataset(model.pooled, dataset, device=device, **options)
    metrics = retrieval_metrics(
        emb, query_labels=dataset.labels, ks=ev.ks, seed=params.seed, nmi=ev.nmi, nmi_restarts=ev.nmi_restarts
    )
    write_json(paths.PRETRAINED_METRICS, metrics)
    log.info("pretrained control: %s", format_metrics(metrics))
