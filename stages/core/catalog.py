"""Every registry in one place, for ``langdml list`` and for tests that check each family."""

from __future__ import annotations


def registries() -> dict[str, list[str]]:
    """Names registered in each family (imports the modules that fill the registries)."""
    from stages.core.datasets import DATASETS
    from stages.core.imagenet import IMAGENET_CLASSIFIERS
    from stages.core.losses import DML_LOSSES, SIMILARITIES
    from stages.core.text import TEXT_ENCODERS
    from stages.core.vision import BACKBONES

    return {
        "datasets": DATASETS.names(),
        "text encoders": TEXT_ENCODERS.names(),
        "imagenet classifiers": IMAGENET_CLASSIFIERS.names(),
        "backbones": BACKBONES.names(),
        "dml losses": DML_LOSSES.names(),
        "similarities": SIMILARITIES.names(),
    }
