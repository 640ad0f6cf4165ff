"""The code deps of each DVC stage, made from its import closure: ``python tests/dvc_deps.py`` rewrites them.

A stage depends on the folders of the leaf packages of ``stages/core`` that its code imports
(``stages/core/evaluation``, not its 12 files; ``stages/core/dml/losses``), on the other library modules it
imports (those beside subpackages: ``stages/core/dml/objective.py``), and on its own stage module. So a new
module in a leaf package the stage already uses needs no edit of dvc.yaml, and a registry that finds its
entries in its package folder (:class:`stages.core.registry.Registry` ``discover``) is covered too. The closure is found
statically (AST), function-level imports included (those under ``if TYPE_CHECKING:`` never run: left out).
``tests/test_dvc_deps.py`` checks that dvc.yaml holds exactly what this makes.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "stages" / "core"


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations only, never run."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _referenced(path: Path) -> set[str]:
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    skipped = _type_checking_blocks(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
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


def _leaf_package(folder: Path) -> bool:
    """A package under stages/core with no package inside it (its folder dep then means its modules only)."""
    return (
        folder != CORE
        and folder.is_relative_to(CORE)
        and not any((sub / "__init__.py").is_file() for sub in folder.iterdir() if sub.is_dir())
    )


def dep_of(path: Path) -> str:
    """The dep that covers ``path``: the folder of a leaf package (``stages/core/evaluation``,
    ``stages/core/dml/losses``), else the file itself (a module beside subpackages, such as
    ``stages/core/dml/objective.py``, so that a stage does not depend on its package's other subpackages)."""
    folder = path.parent if _leaf_package(path.parent) else path
    return folder.relative_to(ROOT).as_posix()


def stage_module(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "langdml", f"stage command {cmd!r} does not run langdml"
    return "stages." + words[1].replace("-", "_")


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(cmd: str) -> list[str]:
    """The sorted code deps of the stage that runs ``cmd``."""
    return sorted({dep_of(p) for p in import_closure(stage_module(cmd))})


def rewrite(text: str) -> str:
    """dvc.yaml with every stage's ``stages/...`` deps replaced by :func:`code_deps` (data deps, their order
    and comments kept; the code deps go last)."""
    specs = stages()
    out: list[str] = []
    stage = None
    in_deps = False
    for line in text.splitlines():
        if m := re.match(r"^  ([A-Za-z_]+):\s*$", line):
            stage = m.group(1)
        if in_deps and not line.startswith("      - "):
            out.extend(f"      - {d}" for d in code_deps(specs[stage]["cmd"]))
            in_deps = False
        if stage and line == "    deps:":
            in_deps = True
        elif in_deps and line.startswith("      - stages/"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    new = rewrite(path.read_text())
    changed = new != path.read_text()
    path.write_text(new)
    print("dvc.yaml: code deps rewritten" if changed else "dvc.yaml: code deps already current")
    sys.exit(0)
