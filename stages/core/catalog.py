"""Every registry in one place, for ``langdml list`` and for tests that check each family."""

from __future__ import annotations


def registries() -> dict[str, list[str]]:
    """Names registered in each family (imports the modules that fill the registries)."""
    from stages.core.crossmodal import SET_HEADS
    from stages.core.datasets.base import DATASETS
    from stages.core.datasets.captions import CAPTION_DATASETS
    from stages.core.heads import HEADS
    from stages.core.imagenet import IMAGENET_CLASSIFIERS
    from stages.core.language_targets import GUIDANCES
    from stages.core.losses import DML_LOSSES
    from stages.core.metrics import SEARCHERS
    from stages.core.optim import OPTIMIZERS, SCHEDULERS
    from stages.core.similarity import SIMILARITIES
    from stages.core.text import TEXT_ENCODERS
    from stages.core.vision import BACKBONES

    return {
        "datasets (dataset.name)": DATASETS.names(),
        "text encoders (text.encoder, family:model)": TEXT_ENCODERS.names(),
        "imagenet classifiers (pseudo_labels.classifier)": IMAGENET_CLASSIFIERS.names(),
        "backbones (model.backbone)": BACKBONES.names(),
        "heads (model.head)": HEADS.names(),
        "dml losses (train.loss, losses.<name>)": DML_LOSSES.names(),
        "language guidance (language.guidance)": GUIDANCES.names(),
        "optimizers (train.optimizer)": OPTIMIZERS.names(),
        "schedulers (train.scheduler)": SCHEDULERS.names(),
        "similarities (language matching)": SIMILARITIES.names(),
        "retrieval similarities (evaluation)": SEARCHERS.names(),
        "caption datasets (crossmodal.data.name)": CAPTION_DATASETS.names(),
        "set heads (crossmodal.model.head)": SET_HEADS.names(),
    }
