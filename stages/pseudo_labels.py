"""Stage pseudo_labels (PLG): each training class's top-k ImageNet names, embedded, computed once.

The pass is :func:`stages.core.language.plg.compute_pseudolabels`; this stage writes
data/pseudolabels/pseudolabels.parquet and a readable data/pseudolabels/pseudolabels.md.
"""

from __future__ import annotations

import logging

from stages import paths
from stages.core.config import Params

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    from stages.core.artifacts import load_manifest, write_pseudolabels
    from stages.core.io import write_text
    from stages.core.language.plg import compute_pseudolabels

    table, root = load_manifest(paths.TRAIN_MANIFEST)
    result = compute_pseudolabels(table, root, params.pseudo_labels, params.text, params.pseudolabels_params())
    write_pseudolabels(paths.PSEUDOLABELS_TABLE, result.table, result.dim, result.metadata)
    write_text(paths.PSEUDOLABELS_REPORT, result.report)
    log.info("pseudo-labels -> %s, %s", paths.PSEUDOLABELS_TABLE, paths.PSEUDOLABELS_REPORT)
