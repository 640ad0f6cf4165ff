"""Each DVC stage's deps cover every module of the package that the stage's code imports.

A module missing from ``deps`` means DVC would not re-run the stage when that module changes, and
``dvc repro`` would keep outputs made by old code. The import closure is found statically (AST),
function-level imports included, plus registries' lazily imported ``modules=`` (string names), so
the test runs in milliseconds and imports nothing. Parameter validation looks names up in registries
by "module:NAME" (stages/core/config.py); that checks names and computes nothing, so it is left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = re.compile(r"^stages(\.\w+)+$")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _referenced(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            names.add(node.value)
    return {n for n in names if n == "stages" or n.startswith("stages.")}


def _trivial(path: Path) -> bool:
    """A package ``__init__`` holding only its docstring runs no code worth a dependency."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body)


def import_closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_referenced(path))
    return {p for p in seen if not _trivial(p)}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage_module(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "langdml", f"stage command {cmd!r} does not run langdml"
    return "stages." + words[1].replace("-", "_")


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def test_closure_follows_function_level_imports_and_registry_modules() -> None:
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.prepare")}
    assert "stages/core/datasets/cub200.py" in closure  # a lazily registered adapter
    assert "stages/core/config.py" in closure
    evaluate = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.evaluate")}
    assert "stages/core/report.py" in evaluate  # imported inside run()


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_its_import_closure(stage: str) -> None:
    spec = _stages()[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    missing = sorted(
        p.relative_to(ROOT).as_posix() for p in import_closure(_stage_module(spec["cmd"])) if not _covered(p, deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps on {missing}"
    stale = [d for d in deps if d.startswith("stages/") and not (ROOT / d).exists()]
    assert not stale, f"dvc.yaml stage {stage!r} lists deps that do not exist: {stale}"
