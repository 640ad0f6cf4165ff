"""Every registry in one place, for ``langdml list`` and for tests that check each family."""

from __future__ import annotations


def registries() -> dict[str, list[str]]:
    """Names registered in each family (imports the modules that fill the registries)."""
    from stages.core.data.datasets.captions import CAPTION_DATASETS
    from stages.core.data.datasets.registry import DATASETS
    from stages.core.dml.losses import DML_LOSSES
    from stages.core.evaluation.search import SEARCHERS
    from stages.core.imagetext.model import SET_HEADS
    from stages.core.imagetext.towers import TEXT_TOWERS
    from stages.core.language.encoders import TEXT_ENCODERS
    from stages.core.language.imagenet import IMAGENET_CLASSIFIERS
    from stages.core.language.targets import GUIDANCES
    from stages.core.model.backbones import BACKBONES
    from stages.core.model.heads import HEADS
    from stages.core.model.similarity import SIMILARITIES
    from stages.core.training.optim import OPTIMIZERS, SCHEDULERS

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
        "caption datasets (imagetext.data.name)": CAPTION_DATASETS.names(),
        "set heads (imagetext.model.head)": SET_HEADS.names(),
        "text towers (imagetext.features.text_tower, family:argument)": TEXT_TOWERS.names(),
    }
