"""Stage ``prepare``: the dataset root -> train/test/classes manifests (data/prepared/)."""

from __future__ import annotations

import contextlib
import logging

from stages import paths
from stages.core.artifacts import CLASSES_SCHEMA, MANIFEST_SCHEMA
from stages.core.config import Params
from stages.core.data.datasets.registry import build_manifests
from stages.core.io import atomic_path
from stages.core.tables import write_parquet

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    """Build and validate everything first, then write the three files together.

    All three go to temporary files and are renamed only when all were written, so a failure leaves
    the previous outputs as they were: never new manifests beside a stale class table.
    """
    ds = params.dataset
    built = build_manifests(ds)
    meta = {"dataset": built.dataset, "root": paths.portable_root(built.root), "max_per_class": ds.max_per_class}
    outputs = [
        (paths.TRAIN_MANIFEST, built.train, MANIFEST_SCHEMA, built.train.num_rows, built.train["label"]),
        (paths.TEST_MANIFEST, built.test, MANIFEST_SCHEMA, built.test.num_rows, built.test["label"]),
        (paths.CLASSES, built.classes, CLASSES_SCHEMA, sum(built.classes["n_images"].to_pylist()), None),
    ]
    with contextlib.ExitStack() as stack:
        for target, table, schema, n_images, labels in outputs:
            n_classes = len(set(labels.to_pylist())) if labels is not None else table.num_rows
            tmp = stack.enter_context(atomic_path(target))
            write_parquet(tmp, table, schema, {**meta, "n_images": n_images, "n_classes": n_classes})
    splits = built.classes["split"].to_pylist()
    log.info(
        "prepared %s: train %d classes / %d images, test %d classes / %d images%s",
        built.dataset,
        splits.count("train"),
        built.train.num_rows,
        splits.count("test"),
        built.test.num_rows,
        f" ({built.n_skipped} unreadable skipped)" if built.n_skipped else "",
    )
