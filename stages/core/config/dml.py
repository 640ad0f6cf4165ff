"""The DML task's params sections (``dataset``, ``text``, ``pseudo_labels``, ``model``, ``language``, ``train``,
``losses``, ``evaluate``, ``index``) and :class:`TrainConfig`, what training reads."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from stages.core.config.base import (
    BackboneSpec,
    NonNegInt,
    OptimizerName,
    PositiveFloat,
    PositiveInt,
    SchedulerName,
    Section,
    Seed,
    SlotHeadsCheck,
    TrackedLocalFiles,
    lookup,
    registered,
)
from stages.core.errors import LangdmlError

DatasetName = registered("stages.core.data.datasets.registry:DATASETS")
TextEncoderSpec = registered("stages.core.language.encoders:TEXT_ENCODERS", require_arg=True)
ClassifierSpec = registered("stages.core.language.imagenet:IMAGENET_CLASSIFIERS")
HeadName = registered("stages.core.model.heads:HEADS")
GuidanceName = registered("stages.core.language.targets:GUIDANCES")
LossName = registered("stages.core.dml.losses:DML_LOSSES")


def _language_similarity(name: str) -> str:
    """``head`` or a registered similarity (the language term's S_img)."""
    if name == "head":
        return name
    registry = lookup("stages.core.model.similarity:SIMILARITIES")
    if name not in registry:
        raise ValueError(f"must be head or one of: {', '.join(registry.names())}")
    return name


LanguageSimilarity = Annotated[str, AfterValidator(_language_similarity)]


class DatasetParams(Section):
    name: DatasetName = "emoji"
    root: str = "data/raw/emoji"
    max_per_class: PositiveInt | None = 200
    train_classes: list[str | int] | None = None
    train_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    split_seed: NonNegInt | None = 0  # emoji, folder: seeded random class split; null = the first by name
    verify_images: bool = True


def _check_template(t: str) -> str:
    if t.count("{}") != 1:
        raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return t


class TextParams(TrackedLocalFiles):
    encoder: TextEncoderSpec = "sentence-transformers:all-MiniLM-L6-v2"
    local_files: str = "data/local/text_encoders"  # a local encoder folder (hf:<folder>) lives here
    _spec_field: ClassVar[str] = "encoder"
    templates: Annotated[list[str], Field(min_length=1)] = ["a photo of a {}"]
    pooling: Literal["pooler", "cls", "mean"] = "mean"
    batch_size: PositiveInt = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        return [_check_template(t) for t in v]


class PseudoLabelParams(Section):
    classifier: ClassifierSpec = "efficientnet-lite0"
    k: Annotated[int, Field(ge=1, le=1000)] = 5
    averaging: Literal["probs", "logits"] = "probs"
    template: str = "a photo of a {}"
    batch_size: PositiveInt = 64
    num_workers: NonNegInt = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: PositiveInt | None = 192  # None = the classifier's native input size
    # classifier: its own eval transform | official: Resize(256) + CenterCrop(image_size; 299 in the paper),
    # zero-padded, as language_guidance.py's relabel pass
    transform: Literal["classifier", "official"] = "classifier"
    compare_transforms: bool = False  # also run the other transform; pseudolabels.md counts the classes that change
    max_per_class: PositiveInt | None = 2  # None = every training image

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v)


class ModelParams(SlotHeadsCheck):
    backbone: BackboneSpec = "efficientnet-lite0"
    pretrained: bool = True
    pooling: Literal["avg", "avg+max"] = "avg"
    embed_dim: PositiveInt = 512
    freeze_bn: bool = True
    image_size: Annotated[int, Field(ge=32)] = 64  # the backbones downsample by 32
    head: HeadName = "linear"  # linear: one vector per image; dive: a set of `slots` vectors (DivE)
    slots: PositiveInt = 4
    slot_depth: PositiveInt = 4  # applications of the weight-tied slot block
    slot_heads: PositiveInt = 4  # attention heads; embed_dim must be a multiple
    alpha: PositiveFloat = 16.0  # smooth-Chamfer temperature (set similarity of losses and retrieval)


class LanguageParams(Section):
    guidance: GuidanceName = "elg"
    gamma: float = 1.0
    temperature: PositiveFloat = 1.0
    target_temperature: PositiveFloat | None = None  # the language side's softmax temperature; null = temperature
    same_class: Literal["fill", "exclude"] = "fill"  # fill: 1 + gamma on both sides (paper); exclude: left out
    direction: Literal["backward", "forward"] = "backward"
    similarity: LanguageSimilarity = "head"  # S_img: the head's own similarity (centred), or one by name
    plg_similarity: Literal["rankwise", "smooth_chamfer"] = "rankwise"  # PLG: rank-wise mean, or names as a set

    def matching_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``language_matching`` that params.yaml sets."""
        return self.model_dump(include={"gamma", "temperature", "target_temperature", "same_class", "direction"})


class AugmentParams(Section):
    """Training augmentation. The paper's recipe (crop scale 0.08-1, flips) suits photos; a flip turns
    "... facing left" icons into "... facing right" ones, and a 0.08 crop of a 64 px icon is a few pixels."""

    flip: bool = False  # random horizontal flips
    min_crop_scale: Annotated[float, Field(gt=0, le=1)] = 0.5  # random-resized-crop area 1 = resize only
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0  # brightness/contrast/saturation strength


class ImageCacheParams(Section):
    """The decoded-image cache (stage ``cache_images``): decode once, crop on the device every epoch."""

    enabled: bool = False  # false: decode the files in DataLoader workers every epoch (datasets too big to cache)
    side: Annotated[int, Field(ge=8)] | None = None  # px of the stored square; null = model.image_size * 256 / 224


class S2SDParams(Section):
    """S2SD (criteria/s2sd.py of the language-guidance code); off by default."""

    enabled: bool = False
    target_dims: Annotated[list[PositiveInt], Field(min_length=1)] = [1024, 1536, 2048]
    temperature: PositiveFloat = 1.0  # --loss_s2sd_T
    weight: Annotated[float, Field(ge=0)] = 0.0  # --loss_s2sd_w (the official default, 0)
    feat_distill: bool = True  # --loss_s2sd_feat_distill
    feat_weight: Annotated[float, Field(ge=0)] = 50.0  # --loss_s2sd_feat_w
    feat_delay: NonNegInt = 1000  # --loss_s2sd_feat_distill_delay, in iterations
    pool_aggr: bool = False  # --loss_s2sd_pool_aggr: average + max pooled features
    # the target heads' and their losses' weight decay; null = train.weight_decay. The official: 0 (their
    # parameter groups set none, and main.py's Adam has no default; criteria/s2sd.py)
    weight_decay: Annotated[float, Field(ge=0)] | None = None


class TrainParams(Section):
    epochs: PositiveInt = 2
    batch_size: PositiveInt = 40
    samples_per_class: PositiveInt = 4
    loss: LossName = "multisimilarity"
    optimizer: OptimizerName = "adamw"
    lr: PositiveFloat = 1e-5
    head_lr: PositiveFloat | None = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 4e-4
    scheduler: SchedulerName = "none"
    milestones: list[PositiveInt] = []
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 0.3
    num_workers: NonNegInt = 2
    log_every: PositiveInt = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    compile: bool = False
    deterministic: bool = False
    diversity: Annotated[float, Field(ge=0)] = 0.01  # weight of DivE's slot-diversity term (set heads only)
    nproc: PositiveInt = 1  # processes (DDP via torchrun); batch_size is the global batch
    evaluate_every: NonNegInt = 0  # test metrics every N epochs (the official protocol); 0 = the final model only
    max_steps_per_epoch: PositiveInt | None = None  # a dry run's cut (benchmarks/paper_scale.py); null = whole epochs
    class_draws: Literal["distinct", "with_replacement"] = "distinct"  # with_replacement: the official sampler
    s2sd: S2SDParams = S2SDParams()
    augment: AugmentParams = AugmentParams()
    image_cache: ImageCacheParams = ImageCacheParams()

    @property
    def effective_head_lr(self) -> float:
        """``head_lr``, or ``lr`` when it is null."""
        return self.head_lr if self.head_lr is not None else self.lr

    @model_validator(mode="after")
    def _batch(self) -> TrainParams:
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_class ({self.samples_per_class})"
            )
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of nproc ({self.nproc})")
        return self


class EvaluateParams(Section):
    batch_size: PositiveInt = 256
    ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4, 8]
    num_workers: NonNegInt = 2
    gallery_queries: PositiveInt = 12
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nmi: bool = True
    nmi_restarts: PositiveInt = 5
    f1: bool = False  # the clustering F1 of the language-guidance code (metrics/f1.py)
    map_at_1000: bool = False  # mAP@1000 of the language-guidance code (metrics/mAP_1000.py)
    precision: Literal["float32", "bfloat16"] = "float32"  # the test embeddings (both official codes: float32)


class IndexParams(Section):
    """The gallery `langdml search` ranks (stage ``index``)."""

    # the test split's manifest, another manifest (.parquet) or a folder of images: a DVC dependency of `index`
    gallery: str = "data/prepared/test.parquet"

    @field_validator("gallery", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("null is no longer a gallery: the test split is data/prepared/test.parquet")
        return v


Omega = Annotated[float, Field(ge=0)]


def _check_losses(v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ``losses.<name>`` section names a registered loss and only keywords its factory takes."""
    check_loss_kwargs = lookup("stages.core.dml.losses:check_loss_kwargs")
    for name, kwargs in v.items():
        try:
            check_loss_kwargs(name, kwargs or {})
        except LangdmlError as err:
            raise ValueError(str(err)) from None
    return v


LossSections = Annotated[dict[str, dict[str, Any]], AfterValidator(_check_losses)]


class TrainConfig(Section):
    """Exactly the params that dvc.yaml lists for ``train``: what training reads, and what its
    checkpoint fingerprint is made from."""

    seed: Seed = 0
    omega: Omega = 1.0
    model: ModelParams = ModelParams()
    language: LanguageParams = LanguageParams()
    train: TrainParams = TrainParams()
    losses: LossSections = {}

    def loss_kwargs(self) -> dict[str, Any]:
        """``losses.<train.loss>``: the keyword arguments of the chosen base loss."""
        return dict(self.losses.get(self.train.loss) or {})
