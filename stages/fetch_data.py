"""Stage ``fetch_data``: obtain the dataset into ``dataset.root`` (the first node of the DAG).

Embedded datasets (emoji from npm, Fashion-MNIST) are fetched and verified; for the others the stage
checks that the user has put the dataset at ``dataset.root`` and says where to get it if not, and
``langdml fetch-data --download`` (a user's request, never the pipeline's) downloads it from its official
source (``--imagetext``: the image-text task's ``imagetext.data``). DVC keeps the folder (``persist``) and does
not copy it into its cache (``cache: false``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.core.config import Params
from stages.core.data.datasets.registry import fetch_dataset
from stages.core.data.datasets.sources import SOURCES
from stages.core.data.download import fetch_source
from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)


def run(params: Params, download: bool = False, imagetext: bool = False) -> None:
    if imagetext:
        data = params.imagetext.data
        if data.name not in SOURCES:
            raise LangdmlError(f"imagetext.data.name {data.name!r} has no source to download; known: {sorted(SOURCES)}")
        if not download:
            raise LangdmlError("--imagetext fetches the image-text data: give --download too")
        fetch_source(SOURCES[data.name], Path(data.root).expanduser())
        return
    root = fetch_dataset(params.dataset, download=download)
    log.info("%s ready in %s", params.dataset.name, root)
