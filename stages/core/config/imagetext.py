"""The image-text task's params (``imagetext:`` in params.yaml), validated as every section is
(:mod:`stages.core.config.base`)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from stages.core.config.base import (
    BackboneSpec,
    NonNegInt,
    OptimizerName,
    PositiveFloat,
    PositiveInt,
    Probability,
    SchedulerName,
    Section,
    SlotHeadsCheck,
    TrackedLocalFiles,
    registered,
)

CaptionDatasetName = registered("stages.core.data.datasets.captions:CAPTION_DATASETS")
SetHeadName = registered("stages.core.imagetext.model:SET_HEADS")
TextTowerSpec = registered("stages.core.imagetext.towers:TEXT_TOWERS", require_arg=True)


class ImageTextDataParams(Section):
    name: CaptionDatasetName = "emoji"
    root: str = "data/raw/emoji"
    split_seed: NonNegInt | None = 0  # emoji: seeded random split of the concepts
    train_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5  # emoji
    max_images: PositiveInt | None = 400  # a seeded sample of N image ids per split; null = all
    # test | validation: a seeded validation_fraction of the training images replaces the test split (for
    # choosing hyper-parameters without seeing the test images)
    holdout: Literal["test", "validation"] = "test"
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    verify_images: bool = True  # decode every image file once; unreadable ones are left out and counted


class ImageTextFeatureParams(TrackedLocalFiles):
    backbone: BackboneSpec = "efficientnet-lite0"
    image_size: Annotated[int, Field(ge=32)] = 64  # the grid is image_size / 32 cells a side
    # frozen:<text encoder> (cached token features) | bigru:<word vectors> | hf:<model> (trainable; token ids)
    text_tower: TextTowerSpec = "frozen:sentence-transformers:all-MiniLM-L6-v2"
    local_files: str = "data/local/text_towers"  # word-vector files and local model folders the tower reads
    _spec_field: ClassVar[str] = "text_tower"
    _path_fields: ClassVar[tuple[str, ...]] = ("vocabulary_file",)
    max_tokens: PositiveInt = 32
    # bigru only (docs/dive.md): regex (words, punctuation dropped) | nltk (DivE's word_tokenize, punctuation kept)
    tokenizer: Literal["regex", "nltk"] = "regex"
    # ranked (every training word by count, with a <mask> row) | official (vocab.py: words seen min_word_count
    # times or more, first-seen order, no <mask> row, so caption drop masks with <unk>)
    vocabulary: Literal["ranked", "official"] = "ranked"
    min_word_count: PositiveInt = 1  # vocab.py's --threshold; rarer training words are <unk> (which then trains)
    vocabulary_file: str | None = (
        None  # DivE's vocab/<data>_vocab.pkl (or JSON word2idx) in local_files, if you have it
    )
    batch_size: PositiveInt = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _word_rules_need_a_word_tower(self) -> ImageTextFeatureParams:
        custom = (self.tokenizer, self.vocabulary, self.min_word_count, self.vocabulary_file) != (
            "regex",
            "ranked",
            1,
            None,
        )
        if custom and not self.text_tower.startswith("bigru:"):
            raise ValueError("tokenizer, vocabulary, min_word_count and vocabulary_file are the bigru tower's")
        return self


class ImageTextModelParams(SlotHeadsCheck):
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
    # exact: padded tokens get no weight and positions run over each set's own length, so a caption embeds the
    # same in any batch | official: as kdwonn/DivE (padding masked before the softmax over slots, positions over
    # the padded batch length), what the published models were trained with; docs/dive.md
    padding: Literal["exact", "official"] = "exact"
    # shared: the global feature is pooled from the projected tokens | separate: the projection runs again for it
    # (model_spm.py spm_fc twice: its own dropout mask and BatchNorm update); the same at evaluation
    image_global_projection: Literal["shared", "separate"] = "shared"


class ImageTextTrainParams(Section):
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
    amp: bool = True  # autocast on CUDA (the official code trains with AMP); no effect on the CPU
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16: with a GradScaler, as DivE's torch.cuda.amp
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: PositiveInt = 1  # processes (DDP via torchrun); batch_size is the global batch
    max_steps_per_epoch: PositiveInt | None = None  # a dry run's cut (benchmarks/paper_scale.py); null = whole epochs


class ImageTextEvalParams(Section):
    ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 5, 10]
    folds: PositiveInt | None = None  # COCO 1K: 5 folds of the 5,000 test images; null = all at once
    queries: PositiveInt = 4  # image and caption queries shown in data/imagetext/eval/retrieval.png


class ImageTextParams(Section):
    data: ImageTextDataParams = ImageTextDataParams()
    features: ImageTextFeatureParams = ImageTextFeatureParams()
    model: ImageTextModelParams = ImageTextModelParams()
    train: ImageTextTrainParams = ImageTextTrainParams()
    evaluate: ImageTextEvalParams = ImageTextEvalParams()
