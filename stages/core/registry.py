"""A tiny name -> factory registry, the way timm's ``create_model`` finds models.

Every pluggable family (dataset adapters, text encoders, backbones, ImageNet classifiers, DML losses,
similarities, language guidances, optimisers, schedulers) is one ``Registry``; code looks things up by
name instead of branching on strings, and an unknown name fails with the list of known ones. A registry
is filled where its entries are defined (decorators) or, where those live in several modules, by one
module that imports them all (``data/datasets/registry.py``): never by lazy imports that run in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from stages.core.errors import LangdmlError

T = TypeVar("T")


class RegistryError(LangdmlError, KeyError):
    """An unknown name; ``str()`` is a one-line message listing the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def parse_spec(spec: str, *, kind: str = "spec", require_arg: bool = False) -> tuple[str, str]:
    """``"family:argument"`` -> ``(family, argument)``; a bare ``"family"`` has an empty argument.

    The one parser for every registry-backed param (``timm:resnet50``, ``open_clip:ViT-B-32/openai``);
    a family that needs an argument says so itself when it gets an empty one.
    """
    family, _, arg = str(spec).partition(":")
    if not family or (require_arg and not arg):
        example = "family:argument" if require_arg else "name or family:argument"
        raise LangdmlError(f"{kind} {spec!r} must look like '{example}'")
    return family, arg


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds a factory under ``name``."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
