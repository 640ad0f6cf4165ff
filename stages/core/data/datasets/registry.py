"""The dataset adapters by name (``dataset.name``) and the datasets langdml can fetch itself.

Filled here, explicitly: the adapters import only ``base`` (their shared checks and table builders), and
this module imports them, so no import runs in a circle.
"""

from __future__ import annotations

from pathlib import Path

from stages.core.config import DatasetParams
from stages.core.data.datasets import cars196, cub200, emoji, fashion_mnist, folder, sop
from stages.core.data.datasets.base import Adapter, Fetcher, Manifests
from stages.core.errors import LangdmlError
from stages.core.registry import Registry

DATASETS: Registry[Adapter] = Registry("dataset")
DATASETS.register("cars196")(cars196.cars196)
DATASETS.register("cub200")(cub200.cub200)
DATASETS.register("emoji")(emoji.emoji)
DATASETS.register("fashion-mnist")(fashion_mnist.fashion_mnist)
DATASETS.register("folder")(folder.folder)
DATASETS.register("sop")(sop.sop)

FETCHERS: Registry[Fetcher] = Registry("fetcher")
FETCHERS.register("emoji")(emoji.fetch_emoji)
FETCHERS.register("fashion-mnist")(fashion_mnist.fetch_fashion_mnist)


def fetch_dataset(params: DatasetParams) -> Path:
    """Obtain the dataset into ``dataset.root`` when langdml knows how; otherwise check the user put it there."""
    root = Path(params.root).expanduser()
    if params.name in FETCHERS:
        return FETCHERS.get(params.name)(root)
    if not root.is_dir():
        raise LangdmlError(
            f"{params.name}: dataset.root '{params.root}' is not a directory; langdml cannot download "
            f"{params.name} (licence terms): download and unpack it there (README: Datasets), or set "
            "dataset.root to where it is"
        )
    return root


def build_manifests(params: DatasetParams) -> Manifests:
    """Run the adapter named by ``dataset.name`` (unknown name: one line listing the known ones)."""
    return DATASETS.get(params.name)(params)
