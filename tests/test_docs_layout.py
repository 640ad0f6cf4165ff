"""docs/development.md's map of the code matches the code: every folder and module it names exists, and every
package of the library is on the map."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^[\w.]+(/|\.py)$")


def _mapped() -> set[Path]:
    """The paths the tree in docs/development.md names: each line's leading names (a folder ``x/``, modules
    ``a.py, b.py``), placed under the folder of the nearest less-indented folder line above it."""
    text = (ROOT / "docs" / "development.md").read_text()
    tree = text.split("```", 2)[1]
    folders: list[tuple[int, Path]] = []
    named: set[Path] = set()
    for line in tree.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip())[0]
        names = [n.strip() for n in head.split(",")]
        if not names or not all(NAME.match(n) for n in names):
            continue  # a description continued on the next line
        while folders and folders[-1][0] >= indent:
            folders.pop()
        parent = folders[-1][1] if folders else ROOT
        for name in names:
            path = parent / name.rstrip("/")
            named.add(path)
            if name.endswith("/"):
                folders.append((indent, path))
    return named


def test_every_path_the_map_names_exists() -> None:
    missing = sorted(p.relative_to(ROOT).as_posix() for p in _mapped() if not p.exists())
    assert not missing, f"docs/development.md names what does not exist: {missing}"


def test_every_library_package_is_on_the_map() -> None:
    core = ROOT / "stages" / "core"
    packages = {p.parent for p in core.rglob("__init__.py")}
    absent = sorted(p.relative_to(ROOT).as_posix() for p in packages - _mapped())
    assert not absent, f"docs/development.md does not name these packages: {absent}"


def test_the_default_runs_numbers_in_docs_pipeline_are_the_committed_metrics() -> None:
    """docs/pipeline.md's sweep quotes the committed default run (the `main` row of `dvc exp show` and the HEAD
    column of `dvc metrics diff`): each number equals data/*/metrics.json at the digits shown."""
    import json
    import re

    text = (ROOT / "docs" / "pipeline.md").read_text()
    dml = json.loads((ROOT / "data" / "eval" / "metrics.json").read_text())
    imagetext = json.loads((ROOT / "data" / "imagetext" / "eval" / "metrics.json").read_text())
    header = next(ln for ln in text.splitlines() if ln.startswith("| Experiment"))
    main = next(ln for ln in text.splitlines() if re.match(r"\| main\s", ln))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = dict(zip(columns, (c.strip() for c in main.strip("|").split("|")), strict=True))
    committed = {**dml, "rsum": imagetext["rsum"]}
    shown = {k: v for k, v in row.items() if k in committed}
    assert shown, "docs/pipeline.md has no `main` row with metrics"
    for key, value in shown.items():
        digits = len(value.partition(".")[2])
        assert value == f"{committed[key]:.{digits}f}", key
    diff = re.findall(r"^data/eval/metrics\.json\s+(\S+)\s+(\S+)\s", text, flags=re.M)
    assert diff, "docs/pipeline.md has no `dvc metrics diff` of data/eval/metrics.json"
    for key, head in diff:
        assert head == f"{dml[key]:.5f}".rstrip("0").rstrip(".") or head == f"{dml[key]:.5f}", key


def test_the_readmes_study_tables_are_langdml_tables_own_output() -> None:
    """Each study table the README shows is `langdml table NAME --out docs/studies` (made from the studies' DVC
    experiments), row for row: no result table is typed in by hand."""
    import re

    readme = (ROOT / "README.md").read_text()
    shown = sorted(set(re.findall(r"docs/studies/([a-z0-9-]+)\.md", readme)))
    assert shown, "the README links no study table (docs/studies/NAME.md)"
    for stem in shown:
        table = (ROOT / "docs" / "studies" / f"{stem}.md").read_text()
        rows = [ln for ln in table.splitlines() if ln.startswith("|")]
        assert len(rows) > 2, stem
        missing = [ln for ln in rows if ln not in readme.splitlines()]
        assert not missing, f"README's {stem} table differs from docs/studies/{stem}.md: {missing[0]}"
