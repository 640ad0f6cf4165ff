"""``params.yaml`` validated into typed objects: the library's configuration types.

One module per task (:mod:`.dml`, :mod:`.imagetext`) on a shared base (:mod:`.base`); this module holds the
whole file's model and its loader.

Each stage calls :func:`load_params` first, so a typo, an unknown registry name or an out-of-range
value fails at once, in one line that names the key and what is allowed, instead of deep inside torch
an hour in. Library functions take the small section they need (``ModelParams``, ``TrainConfig``),
never the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stages.core.config.base import Section, Seed, local_paths
from stages.core.config.dml import (
    AugmentParams,
    DatasetParams,
    EvaluateParams,
    ImageCacheParams,
    IndexParams,
    LanguageParams,
    LossSections,
    ModelParams,
    Omega,
    PseudoLabelParams,
    S2SDParams,
    TextParams,
    TrainConfig,
    TrainParams,
)
from stages.core.config.imagetext import (
    ImageTextDataParams,
    ImageTextEvalParams,
    ImageTextFeatureParams,
    ImageTextModelParams,
    ImageTextParams,
    ImageTextTrainParams,
)
from stages.core.errors import LangdmlError
from stages.core.io import read_text

__all__ = [
    "RENAMED_SECTIONS",
    "AugmentParams",
    "DatasetParams",
    "EvaluateParams",
    "ImageCacheParams",
    "ImageTextDataParams",
    "ImageTextEvalParams",
    "ImageTextFeatureParams",
    "ImageTextModelParams",
    "ImageTextParams",
    "ImageTextTrainParams",
    "IndexParams",
    "LanguageParams",
    "LossSections",
    "ModelParams",
    "Omega",
    "Params",
    "PseudoLabelParams",
    "S2SDParams",
    "TextParams",
    "TrainConfig",
    "TrainParams",
    "load_params",
    "local_paths",
    "parse_params",
]


class Params(Section):
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
    imagetext: ImageTextParams = ImageTextParams()

    def class_embeddings_params(self) -> dict[str, Any]:
        """The params that decide the ELG cache: stored in it, checked by every stage that reads it."""
        t = self.text
        return {"text.encoder": t.encoder, "text.templates": list(t.templates), "text.pooling": t.pooling}

    def pseudolabels_params(self) -> dict[str, Any]:
        """The params that decide the PLG cache: stored in it, checked by every stage that reads it."""
        p, t = self.pseudo_labels, self.text
        keys = ("classifier", "k", "averaging", "template", "image_size", "transform", "max_per_class")
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


# Sections renamed in a release -> their new name (the README's changelog says when and why).
RENAMED_SECTIONS = {"crossmodal": "imagetext"}


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LangdmlError(f"{source}: expected a mapping of parameters, got {type(raw).__name__}")
    for old, new in RENAMED_SECTIONS.items():
        if old in raw:
            raise LangdmlError(f"{source}: {old}: renamed to {new}; rename the section (its keys are unchanged)")
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
