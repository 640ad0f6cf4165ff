"""``params.yaml`` validated into typed objects: the library's configuration types.

Each stage calls :func:`load_params` first, so a typo, an unknown registry name or an out-of-range
value fails at once, in one line that names the key and what is allowed, instead of deep inside torch
an hour in. Library functions take the small section they need (``ModelParams``, ``TrainConfig``),
never the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.core.errors import LangdmlError
from stages.core.io import read_text
from stages.core.registry import parse_spec

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _lookup(path: str) -> Any:
    """The object ``module:NAME``, imported on use: validating a name loads its registry, but the
    config module itself imports no implementation (so a stage's import closure stays its own)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def registered(registry_path: str, *, require_arg: bool = False) -> Any:
    """A ``str`` param whose family (``family:argument``) must be a name of the registry at ``module:NAME``."""

    def check(spec: str) -> str:
        registry = _lookup(registry_path)
        try:
            family, _ = parse_spec(spec, kind=registry.kind, require_arg=require_arg)
            registry.get(family)
        except LangdmlError as err:
            raise ValueError(str(err)) from None
        return spec

    return Annotated[str, AfterValidator(check)]


def local_paths(spec: str) -> list[Path]:
    """The local files or folders a ``family:argument`` spec names (``bigru:file:/x/glove.txt``,
    ``hf:./my-bert``, ``frozen:hf:/models/bert``): every ``:``-suffix that exists on disk."""
    parts = spec.split(":")
    return [Path(":".join(parts[i:])) for i in range(1, len(parts)) if Path(":".join(parts[i:])).exists()]


class _TrackedLocalFiles(_Section):
    """A section whose spec ``field`` may name local files: they must lie in ``local_files``, the folder that
    dvc.yaml makes a dependency of the stages that read them, so editing one re-runs them (``dvc status`` says
    so) instead of DVC seeing only the param's unchanged string."""

    local_files: str
    _spec_field: ClassVar[str] = ""  # the spec that may name local files

    @model_validator(mode="after")
    def _inside_local_files(self) -> _TrackedLocalFiles:
        root = Path(self.local_files).resolve()
        for path in local_paths(getattr(self, self._spec_field)):
            if not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{self._spec_field} reads {path}, outside local_files ({self.local_files}), so DVC would not "
                    f"see it change: move it into {self.local_files}, or set local_files to a folder that holds it"
                )
        return self


DatasetName = registered("stages.core.data.datasets.registry:DATASETS")
TextEncoderSpec = registered("stages.core.language.encoders:TEXT_ENCODERS", require_arg=True)
ClassifierSpec = registered("stages.core.language.imagenet:IMAGENET_CLASSIFIERS")
BackboneSpec = registered("stages.core.model.backbones:BACKBONES")
HeadName = registered("stages.core.model.heads:HEADS")
GuidanceName = registered("stages.core.language.targets:GUIDANCES")
LossName = registered("stages.core.training.losses:DML_LOSSES")
OptimizerName = registered("stages.core.training.optim:OPTIMIZERS")
CaptionDatasetName = registered("stages.core.data.datasets.captions:CAPTION_DATASETS")
SetHeadName = registered("stages.core.imagetext.model:SET_HEADS")
TextTowerSpec = registered("stages.core.imagetext.towers:TEXT_TOWERS", require_arg=True)
Probability = Annotated[float, Field(ge=0, lt=1)]
SchedulerName = registered("stages.core.training.optim:SCHEDULERS")


def _language_similarity(name: str) -> str:
    """``head`` or a registered similarity (the language term's S_img)."""
    if name == "head":
        return name
    registry = _lookup("stages.core.model.similarity:SIMILARITIES")
    if name not in registry:
        raise ValueError(f"must be head or one of: {', '.join(registry.names())}")
    return name


LanguageSimilarity = Annotated[str, AfterValidator(_language_similarity)]


class DatasetParams(_Section):
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


class TextParams(_TrackedLocalFiles):
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


class PseudoLabelParams(_Section):
    classifier: ClassifierSpec = "efficientnet-lite0"
    k: Annotated[int, Field(ge=1, le=1000)] = 5
    averaging: Literal["probs", "logits"] = "probs"
    template: str = "a photo of a {}"
    batch_size: PositiveInt = 64
    num_workers: NonNegInt = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: PositiveInt | None = 192  # None = the classifier's native input size
    max_per_class: PositiveInt | None = 2  # None = every training image

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v)


class _SlotHeadsCheck(_Section):
    """A slot head splits ``embed_dim`` over ``slot_heads`` attention heads (both model sections)."""

    @model_validator(mode="after")
    def _slot_heads(self) -> _SlotHeadsCheck:
        dim, heads = self.embed_dim, self.slot_heads  # type: ignore[attr-defined]
        if dim % heads and getattr(self, "slot_head_dim", None) is None:
            raise ValueError(f"embed_dim ({dim}) must be a multiple of slot_heads ({heads})")
        return self


class ModelParams(_SlotHeadsCheck):
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


class LanguageParams(_Section):
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


class AugmentParams(_Section):
    """Training augmentation. The paper's recipe (crop scale 0.08-1, flips) suits photos; a flip turns
    "... facing left" icons into "... facing right" ones, and a 0.08 crop of a 64 px icon is a few pixels."""

    flip: bool = False  # random horizontal flips
    min_crop_scale: Annotated[float, Field(gt=0, le=1)] = 0.5  # random-resized-crop area 1 = resize only
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0  # brightness/contrast/saturation strength


def eval_resize(image_size: int) -> int:
    """The short side an ``image_size`` crop is taken from at evaluation (256 for 224, as the paper)."""
    return round(image_size * 256 / 224)


class ImageCacheParams(_Section):
    """The decoded-image cache (stage ``cache_images``): decode once, crop on the device every epoch."""

    enabled: bool = False  # false: decode the files in DataLoader workers every epoch (datasets too big to cache)
    side: Annotated[int, Field(ge=8)] | None = None  # px of the stored square; null = model.image_size * 256 / 224

    def resolved_side(self, image_size: int) -> int:
        return self.side if self.side is not None else eval_resize(image_size)


class S2SDParams(_Section):
    """S2SD (criteria/s2sd.py of the language-guidance code); off by default."""

    enabled: bool = False
    target_dims: Annotated[list[PositiveInt], Field(min_length=1)] = [1024, 1536, 2048]
    temperature: PositiveFloat = 1.0  # --loss_s2sd_T
    weight: Annotated[float, Field(ge=0)] = 0.0  # --loss_s2sd_w (the official default, 0)
    feat_distill: bool = True  # --loss_s2sd_feat_distill
    feat_weight: Annotated[float, Field(ge=0)] = 50.0  # --loss_s2sd_feat_w
    feat_delay: NonNegInt = 1000  # --loss_s2sd_feat_distill_delay, in iterations
    pool_aggr: bool = False  # --loss_s2sd_pool_aggr: average + max pooled features


class TrainParams(_Section):
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


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256
    ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4, 8]
    num_workers: NonNegInt = 2
    gallery_queries: PositiveInt = 12
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nmi: bool = True
    nmi_restarts: PositiveInt = 5
    f1: bool = False  # the clustering F1 of the language-guidance code (metrics/f1.py)
    map_at_1000: bool = False  # mAP@1000 of the language-guidance code (metrics/mAP_1000.py)


class IndexParams(_Section):
    """The gallery `langdml search` ranks (stage ``index``)."""

    # the test split's manifest, another manifest (.parquet) or a folder of images: a DVC dependency of `index`
    gallery: str = "data/prepared/test.parquet"

    @field_validator("gallery", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("null is no longer a gallery: the test split is data/prepared/test.parquet")
        return v


class CrossModalDataParams(_Section):
    name: CaptionDatasetName = "emoji"
    root: str = "data/raw/emoji"
    split_seed: NonNegInt | None = 0  # emoji: seeded random split of the concepts
    train_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5  # emoji
    max_images: PositiveInt | None = 400  # a seeded sample of N image ids per split; null = all
    verify_images: bool = True  # decode every image file once; unreadable ones are left out and counted


class CrossModalFeatureParams(_TrackedLocalFiles):
    backbone: BackboneSpec = "efficientnet-lite0"
    image_size: Annotated[int, Field(ge=32)] = 64  # the grid is image_size / 32 cells a side
    # frozen:<text encoder> (cached token features) | bigru:<word vectors> | hf:<model> (trainable; token ids)
    text_tower: TextTowerSpec = "frozen:sentence-transformers:all-MiniLM-L6-v2"
    local_files: str = "data/local/text_towers"  # word-vector files and local model folders the tower reads
    _spec_field: ClassVar[str] = "text_tower"
    max_tokens: PositiveInt = 32
    batch_size: PositiveInt = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CrossModalModelParams(_SlotHeadsCheck):
    head: SetHeadName = "dive"  # dive: K slots per image and caption | maxpool: one max-pooled vector (K=1)
    embed_dim: PositiveInt = 256
    slots: PositiveInt = 4
    slot_depth: PositiveInt = 2
    slot_heads: PositiveInt = 4
    alpha: PositiveFloat = 16.0  # smooth-Chamfer temperature
    slot_head_dim: PositiveInt | None = None  # width of each attention head; null = embed_dim / slot_heads
    dropout: Probability = 0.0  # attention output, feed-forward, word embeddings and GRU (DivE --dropout)
    global_pool: Literal["mean", "max"] = "mean"  # the projected tokens -> the global feature (--img_res_pool)
    image_local_dropout: Probability = 0.0  # on the projected image tokens (--img_1x1_dropout)
    image_local_bn: bool = False  # BatchNorm in the image projection's MLP (--gpo_1x1)
    text_positions: bool = False  # sine positions on the text keys (--spm_txt_pos_enc_type sine)


class CrossModalTrainParams(_Section):
    epochs: PositiveInt = 30
    batch_size: Annotated[int, Field(ge=2)] = 64  # images per batch, each with all its captions (DivE: 200)
    lr: PositiveFloat = 1e-3
    image_lr_scale: PositiveFloat = 0.1  # DivE's img_pie_lr_scale: the image tower (no CNN on cached features)
    text_lr_scale: PositiveFloat = 1.0  # DivE's txt_lr_scale: the text tower but its set module
    text_set_lr_scale: PositiveFloat = 0.1  # DivE's txt_pie_lr_scale: the text tower's set prediction module
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    margin: PositiveFloat = 0.2  # VSE++ hardest-negative triplet margin
    warmup_epochs: NonNegInt = 0  # epochs that average every negative's violation (VSE0) before the hardest
    mmd: Annotated[float, Field(ge=0)] = 0.01
    diversity: Annotated[float, Field(ge=0)] = 0.01
    caption_drop: Probability = 0.0  # token ids masked / swapped / deleted per token (--caption_drop_prob)
    region_drop: Probability = 0.0  # image tokens dropped per token (--butd_drop_prob)
    clip: PositiveFloat | None = 1.0  # gradient-norm clipping; null = off
    optimizer: OptimizerName = "adamw"
    scheduler: SchedulerName = "cosine_step"  # cosine per step, no warm-up (DivE's train.py)
    amp: bool = True  # bf16 autocast on CUDA (the official code trains with AMP); no effect on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: PositiveInt = 1  # processes (DDP via torchrun); batch_size is the global batch


class CrossModalEvalParams(_Section):
    ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 5, 10]
    folds: PositiveInt | None = None  # COCO 1K: 5 folds of the 5,000 test images; null = all at once
    queries: PositiveInt = 4  # image and caption queries shown in data/crossmodal/eval/retrieval.png


class CrossModalParams(_Section):
    data: CrossModalDataParams = CrossModalDataParams()
    features: CrossModalFeatureParams = CrossModalFeatureParams()
    model: CrossModalModelParams = CrossModalModelParams()
    train: CrossModalTrainParams = CrossModalTrainParams()
    evaluate: CrossModalEvalParams = CrossModalEvalParams()


Seed = Annotated[int, Field(ge=0, lt=2**32)]  # the range every RNG we seed (NumPy's legacy one too) accepts
Omega = Annotated[float, Field(ge=0)]


def _check_losses(v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ``losses.<name>`` section names a registered loss and only keywords its factory takes."""
    check_loss_kwargs = _lookup("stages.core.training.losses:check_loss_kwargs")
    for name, kwargs in v.items():
        try:
            check_loss_kwargs(name, kwargs or {})
        except LangdmlError as err:
            raise ValueError(str(err)) from None
    return v


LossSections = Annotated[dict[str, dict[str, Any]], AfterValidator(_check_losses)]


class TrainConfig(_Section):
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


class Params(_Section):
    recipe: str | None = None  # the recipe last written in (`langdml recipe NAME`), for the record; no stage reads it
    seed: Seed = 0
    omega: Omega = 1.0
    dataset: DatasetParams = DatasetParams()
    text: TextParams = TextParams()
    pseudo_labels: PseudoLabelParams = PseudoLabelParams()
    model: ModelParams = ModelParams()
    language: LanguageParams = LanguageParams()
    train: TrainParams = TrainParams()
    losses: LossSections = {}
    evaluate: EvaluateParams = EvaluateParams()
    index: IndexParams = IndexParams()
    crossmodal: CrossModalParams = CrossModalParams()

    def class_embeddings_params(self) -> dict[str, Any]:
        """The params that decide the ELG cache: stored in it, checked by every stage that reads it."""
        t = self.text
        return {"text.encoder": t.encoder, "text.templates": list(t.templates), "text.pooling": t.pooling}

    def pseudolabels_params(self) -> dict[str, Any]:
        """The params that decide the PLG cache: stored in it, checked by every stage that reads it."""
        p, t = self.pseudo_labels, self.text
        keys = ("classifier", "k", "averaging", "template", "image_size", "max_per_class")
        return {
            **{f"pseudo_labels.{k}": getattr(p, k) for k in keys},
            "text.encoder": t.encoder,
            "text.pooling": t.pooling,
        }

    @property
    def training(self) -> TrainConfig:
        return TrainConfig(
            seed=self.seed,
            omega=self.omega,
            model=self.model,
            language=self.language,
            train=self.train,
            losses=self.losses,
        )


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        section: Any = Params
        for part in first["loc"][:-1]:
            section = section.model_fields[str(part)].annotation
        allowed = ", ".join(section.model_fields) if isinstance(section, type) else "?"
        msg = f"unknown key; allowed here: {allowed}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], dict) and repr(first["input"]) not in msg:
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LangdmlError(f"{source}: expected a mapping of parameters, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise LangdmlError(_format_error(source, err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    p = Path(path)
    if not p.is_file():
        raise LangdmlError(f"{p}: parameter file not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(read_text(p))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LangdmlError(f"{p}: not valid YAML{where}: {problem}") from None
    return parse_params(raw, str(p))
