"""A tiny name -> factory registry, the way timm's ``create_model`` finds models.

Every pluggable family (dataset adapters, text encoders, backbones, ImageNet classifiers, DML losses,
similarities, text towers, language guidances, optimisers, schedulers) is one ``Registry``; code looks
things up by name instead of branching on strings, and an unknown name fails with the list of known ones.
Entries register themselves where they are defined (decorators). A family with an entry per module
names its package (``discover``): the first lookup imports every module of that package, so a new entry
is one new module there and no edit anywhere else (and DVC sees it: stage deps are package folders).
"""

from __future__ import annotations

import importlib
import pkgutil
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
    def __init__(self, kind: str, discover: str | None = None) -> None:
        """``discover``: the package whose modules define the entries (imported on the first lookup)."""
        self.kind = kind
        self.discover = discover
        self._items: dict[str, T] = {}
        self._searched: set[str] = set()

    def _discover(self) -> None:
        """Import the package's modules not imported yet (a module added since is found on the next miss)."""
        if self.discover is None:
            return
        package = importlib.import_module(self.discover)
        for info in pkgutil.iter_modules(package.__path__, f"{self.discover}."):
            if info.name not in self._searched:
                self._searched.add(info.name)
                importlib.import_module(info.name)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds a factory under ``name``."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            self._discover()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self._discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
