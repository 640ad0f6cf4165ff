"""Stage ``fetch_data``: obtain the dataset into ``dataset.root`` (the first node of the DAG).

Embedded datasets (emoji from npm, Fashion-MNIST) are fetched and verified; for the others the stage
checks that the user has put the dataset at ``dataset.root`` and says where to get it if not. DVC
keeps the folder (``persist``) and does not copy it into its cache (``cache: false``).
"""

from __future__ import annotations

import logging

from stages.core.config import Params
from stages.core.data.datasets.registry import fetch_dataset

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    root = fetch_dataset(params.dataset)
    log.info("%s ready in %s", params.dataset.name, root)
