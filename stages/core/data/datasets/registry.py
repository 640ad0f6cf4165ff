"""Fetch or build the dataset that ``dataset.name`` names (the registries, filled by the adapters' own
modules, are in ``base``; the official sources of the datasets langdml does not ship are in ``sources``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from stages.core.config import DatasetParams
from stages.core.data.datasets.base import DATASETS, FETCHERS, Manifests
from stages.core.data.datasets.sources import SOURCES
from stages.core.data.download import Source, fetch_source, holds
from stages.core.errors import LangdmlError


def fetch_dataset(params: DatasetParams, download: bool = False) -> Path:
    """Obtain the dataset into ``dataset.root`` when langdml ships it (emoji, Fashion-MNIST) or, with
    ``download``, from its official source; otherwise check that the user put it there."""
    root = Path(params.root).expanduser()
    if params.name in FETCHERS:
        return FETCHERS.get(params.name)(root)
    source = SOURCES.get(params.name)
    if source is not None and download:
        return fetch_source(source, root)
    problem = missing(params.name, root, "dataset.root")
    if problem:
        raise LangdmlError(problem)
    return root


def missing(name: str, root: Path, key: str) -> str | None:
    """Why ``root`` (the value of ``key``) cannot hold dataset ``name``, with how to get it; None when it can."""
    source = SOURCES.get(name)
    if source is None or name in FETCHERS:
        if root.is_dir() or name in FETCHERS:
            return None
        return f"{name}: {key} '{root}' is not a directory; put the dataset there, or set {key} to where it is"
    if holds(source, root) or (not source.archives and root.is_dir() and any(root.iterdir())):
        return None
    return f"{name}: {key} '{root}' does not hold it (no {source.marker}); {how_to_get(source, key)}"


def how_to_get(source: Source, key: str) -> str:
    if not source.archives:
        return source.manual
    hosts = sorted({urlparse(a.url).netloc for a in source.archives})
    return (
        f"`langdml fetch-data --download` downloads it there ({source.size} from {', '.join(hosts)}; licence: "
        f"{source.licence}), or set {key} to your copy"
    )


def build_manifests(params: DatasetParams) -> Manifests:
    """Run the adapter named by ``dataset.name`` (unknown name: one line listing the known ones)."""
    return DATASETS.get(params.name)(params)
