"""Fetch or build the dataset that ``dataset.name`` names (the registries, filled by the adapters' own
modules, are in ``base``)."""

from __future__ import annotations

from pathlib import Path

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import DATASETS, FETCHERS, Manifests
from stages.core.errors import LangdmlError


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
