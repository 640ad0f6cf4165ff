"""Stage ``index``: the test split (the gallery) embedded once by the trained model, for `langdml search`
(data/index/: embeddings, items and the model's fingerprint)."""

from __future__ import annotations

import logging

import pyarrow as pa

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.artifacts import load_manifest
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import eval_transform
    from stages.core.evaluation.embedding import embed_dataset
    from stages.core.model.encoder import load_model
    from stages.core.runtime import resolve_device
    from stages.core.serving.index import model_fingerprint, write_index

    ev = params.evaluate
    device = resolve_device(ev.device)
    model, model_params = load_model(paths.MODEL, device)
    table, root = load_manifest(paths.TEST_MANIFEST)
    dataset = ImageDataset(table, root, eval_transform(model_params.image_size, model.mean, model.std))
    emb = embed_dataset(model, dataset, batch_size=ev.batch_size, num_workers=ev.num_workers, device=device)
    items = pa.table(
        {
            "row": pa.array(range(table.num_rows), pa.int64()),
            "path": [str(root / p) if p is not None else None for p in table.column("path").to_pylist()],
            "label": table.column("label"),
            "class_name": table.column("class_name"),
        }
    )
    write_index(paths.INDEX, emb, items, model_fingerprint(paths.MODEL_WEIGHTS), model.similarity)
    log.info("index: %d gallery items (%s) -> %s", len(emb), " x ".join(map(str, emb.shape)), paths.INDEX)
