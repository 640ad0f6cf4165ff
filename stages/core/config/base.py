"""What every params section is built from: the strict base model, registry-checked names, numeric ranges,
and the two cross-field checks that several sections share. Each task's sections (``stages.core.config`` for
DML, ``stages.core.config.imagetext`` for image-text) build on these; this module imports no implementation:
a registry is imported when a value is validated, so a stage's import closure stays its own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from stages.core.errors import LangdmlError
from stages.core.registry import parse_spec

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def lookup(path: str) -> Any:
    """The object ``module:NAME``, imported on use: validating a name loads its registry, but the
    config module itself imports no implementation (so a stage's import closure stays its own)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def registered(registry_path: str, *, require_arg: bool = False) -> Any:
    """A ``str`` param whose family (``family:argument``) must be a name of the registry at ``module:NAME``."""

    def check(spec: str) -> str:
        registry = lookup(registry_path)
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


class TrackedLocalFiles(Section):
    """A section whose spec ``field`` may name local files: they must lie in ``local_files``, the folder that
    dvc.yaml makes a dependency of the stages that read them, so editing one re-runs them (``dvc status`` says
    so) instead of DVC seeing only the param's unchanged string."""

    local_files: str
    _spec_field: ClassVar[str] = ""  # the spec that may name local files
    _path_fields: ClassVar[tuple[str, ...]] = ()  # fields that are a local file's path (or null)

    @model_validator(mode="after")
    def _inside_local_files(self) -> TrackedLocalFiles:
        root = Path(self.local_files).resolve()
        named = [(self._spec_field, p) for p in local_paths(getattr(self, self._spec_field))]
        named += [(f, Path(getattr(self, f))) for f in self._path_fields if getattr(self, f)]
        for field, path in named:
            if not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{field} reads {path}, outside local_files ({self.local_files}), so DVC would not "
                    f"see it change: move it into {self.local_files}, or set local_files to a folder that holds it"
                )
        return self


class SlotHeadsCheck(Section):
    """A slot head splits ``embed_dim`` over ``slot_heads`` attention heads (both model sections)."""

    @model_validator(mode="after")
    def _slot_heads(self) -> SlotHeadsCheck:
        dim, heads = self.embed_dim, self.slot_heads  # type: ignore[attr-defined]
        if dim % heads and getattr(self, "slot_head_dim", None) is None:
            raise ValueError(f"embed_dim ({dim}) must be a multiple of slot_heads ({heads})")
        return self


Probability = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # the range every RNG we seed (NumPy's legacy one too) accepts
BackboneSpec = registered("stages.core.model.backbones:BACKBONES")
OptimizerName = registered("stages.core.training.optim:OPTIMIZERS")
SchedulerName = registered("stages.core.training.optim:SCHEDULERS")
