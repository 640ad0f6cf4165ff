"""Stage ``index``: the gallery embedded once by the trained model, for `langdml search` (data/index/:
embeddings, items and the model's fingerprint). The gallery is ``index.gallery``: the test split's manifest (the
default), another manifest, or a folder of images (each file's class: its folder's name), every image inside its
root. dvc.yaml makes that path a dependency, so editing the manifest or the folder's images re-runs the stage.
The test split is not embedded twice: the rows evaluate wrote (data/eval/test_embeddings.parquet) are taken when
they come from the same manifest and weights in float32."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.model.encoder import load_model
    from stages.core.runtime import resolve_device
    from stages.core.serving.index import model_fingerprint, write_index
    from stages.core.serving.queries import embed_table, evaluated_embeddings, gallery_table

    ev = params.evaluate
    device = resolve_device(ev.device)
    model, model_params = load_model(paths.MODEL, device)
    table, root = gallery_table(params.index.gallery)
    emb = evaluated_embeddings(params.index.gallery, paths.TEST_EMBEDDINGS, paths.MODEL_WEIGHTS)
    if emb is None:
        emb = embed_table(model, model_params.image_size, table, root, device, ev.batch_size, ev.num_workers)
    else:
        log.info("index: the gallery is the evaluated test split: its %d embeddings are reused", len(emb))
    items = pa.table(
        {
            "row": pa.array(range(table.num_rows), pa.int64()),
            "path": [str(Path(root) / p) if p is not None else None for p in table.column("path").to_pylist()],
            "label": table.column("label"),
            "class_name": table.column("class_name"),
        }
    )
    write_index(paths.INDEX, emb, items, model_fingerprint(paths.MODEL_WEIGHTS), model.similarity)
    log.info("index: %d gallery items (%s) -> %s", len(emb), " x ".join(map(str, emb.shape)), paths.INDEX)
