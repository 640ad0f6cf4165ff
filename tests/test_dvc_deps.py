"""Each DVC stage's deps are what ``tests/dvc_deps.py`` makes from its import closure, and they cover it.

A module missing from ``deps`` means DVC would not re-run the stage when that module changes, and
``dvc repro`` would keep outputs made by old code. The closure is static (AST), so these tests import
nothing. Parameter validation looks names up in registries by "module:NAME" (stages/core/config/base.py);
that checks names and computes nothing, so it is left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc_deps import ROOT, _referenced, code_deps, import_closure, module_file, rewrite, stage_module, stages

_stages = stages
_stage_module = stage_module


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def test_dvc_yaml_holds_the_generated_code_deps() -> None:
    """A contributor who adds a module to a package that a stage imports edits nothing; one who adds a new
    package or a new import across packages runs ``python tests/dvc_deps.py`` (``make deps``)."""
    text = (ROOT / "dvc.yaml").read_text()
    assert rewrite(text) == text, "dvc.yaml's code deps are stale: run `make deps` (python tests/dvc_deps.py)"


def test_closure_follows_function_level_imports_and_registries_are_covered_by_their_folder() -> None:
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("stages.prepare")}
    assert "stages/core/config/__init__.py" in closure
    # the dataset registry imports its package's modules when first asked: its folder is the dep
    assert "stages/core/data/datasets" in code_deps("langdml prepare")
    assert "stages/core/dml/losses" in code_deps("langdml train")
    assert "stages/core/imagetext/towers" in code_deps("langdml imagetext-train")
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


@pytest.mark.parametrize("stage", ["train", "imagetext_train"])
def test_train_stage_params_are_exactly_what_its_checkpoint_fingerprint_reads(stage: str) -> None:
    """A param DVC tracks but the fingerprint ignores would resume a checkpoint made under another value;
    one the fingerprint reads but DVC does not track would leave `dvc repro` blind to it."""
    from stages.core.config import Params
    from stages.core.dml.objective import fingerprint_params as dml_fingerprint
    from stages.core.imagetext.objective import fingerprint_params as imagetext_fingerprint

    params = Params()
    xm = params.imagetext
    read = {
        "train": dml_fingerprint(params.training),
        "imagetext_train": imagetext_fingerprint(params.seed, xm.model, xm.train),
    }[stage]
    assert set(read) == set(_stages()[stage]["params"])
