"""Each DVC stage's deps cover every module of the package that the stage's code imports.

A module missing from ``deps`` means DVC would not re-run the stage when that module changes, and
``dvc repro`` would keep outputs made by old code. The import closure is found statically (AST),
function-level imports included (imports under ``if TYPE_CHECKING:`` are never run: left out), so
the test runs in milliseconds and imports nothing. Parameter validation looks names up in registries
by "module:NAME" (stages/core/config.py); that checks names and computes nothing, so it is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


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


def test_closure_follows_function_level_imports_and_the_dataset_registry() -> None:
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.prepare")}
    assert "stages/core/data/datasets/cub200.py" in closure  # a lazily registered adapter
    assert "stages/core/config.py" in closure
    evaluate = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.evaluate")}
    assert "stages/core/evaluation/report.py" in evaluate  # imported inside run()


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


def _library_graph() -> dict[str, set[str]]:
    """Module -> the stages.core modules it imports (function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "stages" / "core").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for ref in _referenced(path):
            for candidate in (ref, ref.rpartition(".")[0]):  # `from a.b import c`: c is a module or a name
                if candidate.startswith("stages.core") and module_file(candidate) is not None:
                    targets.add(candidate)
                    break
        graph[name] = targets - {name}
    return graph


def test_the_library_has_no_import_cycle_and_never_imports_a_stage() -> None:
    graph = _library_graph()
    for name in graph:
        for path in (ROOT / "stages" / "core").rglob("*.py"):
            rel = path.relative_to(ROOT)
            if ".".join(rel.with_suffix("").parts).removesuffix(".__init__") == name:
                stray = [r for r in _referenced(path) if r.startswith("stages.") and not r.startswith("stages.core")]
                assert not stray, f"{name} imports the app: {stray}"
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(nxt_name := node, set())):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [nxt_name, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if state.get(nxt) is None:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])


@pytest.mark.parametrize("stage", ["train", "xm_train"])
def test_train_stage_params_are_exactly_what_its_checkpoint_fingerprint_reads(stage: str) -> None:
    """A param DVC tracks but the fingerprint ignores would resume a checkpoint made under another value;
    one the fingerprint reads but DVC does not track would leave `dvc repro` blind to it."""
    from stages.core.config import Params
    from stages.core.imagetext.objective import fingerprint_params as xm_fingerprint
    from stages.core.training.dml import fingerprint_params as dml_fingerprint

    params = Params()
    xm = params.crossmodal
    read = {
        "train": dml_fingerprint(params.training),
        "xm_train": xm_fingerprint(params.seed, xm.model, xm.train),
    }[stage]
    assert set(read) == set(_stages()[stage]["params"])
