"""Recipes: each sets exactly what its table of official flags says, validates, and is documented as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stages.core.config import parse_params
from stages.core.errors import LangdmlError
from stages.core.recipe import apply_recipe, load_recipe, recipe_names, recipes_markdown, set_values

ROOT = Path(__file__).resolve().parents[1]


def test_there_are_recipes_and_the_base_files_are_not_among_them() -> None:
    names = recipe_names()
    assert "roth22/cub200-rn512-ms-plg" in names and not any(n.endswith("/base") for n in names)


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_sets_exactly_what_its_table_says(name: str) -> None:
    recipe = load_recipe(name)
    rows = {r["param"]: r for r in recipe.official}
    hidden = sorted(set(recipe.params) - set(rows))
    assert not hidden, f"{name} sets {hidden} without a row saying which official flag they come from"
    for param, row in rows.items():
        assert param in recipe.params, f"{name}: the row of {row['flag']} names {param}, which the recipe does not set"
        assert recipe.params[param] == row["ours"], (name, param)
    assert all(row["source"] for row in recipe.official)


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_validates_on_the_projects_params(name: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    changed = apply_recipe(params, name)
    assert changed and any(line.startswith("recipe: ") for line in changed)
    written = parse_params(yaml.safe_load(params.read_text()))
    recipe = load_recipe(name)
    assert written.recipe == f"{name}@{recipe.version}"
    for key, value in recipe.params.items():
        node = yaml.safe_load(params.read_text())
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_writing_keeps_comments_and_columns_and_overrides_win(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    apply_recipe(params, "roth22/cub200-rn512-ms-plg", {"train.epochs": 3, "model.image_size": 64})
    after = params.read_text()
    comments = [[ln.partition("#")[2] for ln in text.splitlines()] for text in (before, after)]
    assert comments[0] == comments[1]  # every comment kept, on its line
    line = next(ln for ln in after.splitlines() if ln.startswith("  name: cub200"))
    original = next(ln for ln in before.splitlines() if ln.startswith("  name: emoji"))
    assert line.index("#") == original.index("#")  # the comment stays in its column
    raw = yaml.safe_load(after)
    assert raw["train"]["epochs"] == 3 and raw["model"]["image_size"] == 64 and raw["omega"] == 10.0
    assert raw["losses"]["multisimilarity_roth"] == {"alpha": 2.0, "beta": 40.0, "margin": 0.1, "threshold": 0.5}


def test_a_bad_recipe_value_or_key_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(LangdmlError, match=r"train\.epochs: Input should be greater than 0"):
        apply_recipe(params, "roth22/cub200-rn512-ms-plg", {"train.epochs": 0})
    with pytest.raises(LangdmlError, match=r"has no key train\.nope"):
        apply_recipe(params, "roth22/cub200-rn512-ms-plg", {"train.nope": 1})
    with pytest.raises(LangdmlError, match="unknown recipe 'roth22/cub'"):
        apply_recipe(params, "roth22/cub")
    assert params.read_text() == before


def test_set_values_replaces_block_lists_and_inline_mappings() -> None:
    text = "a:\n  ks:\n  - 1\n  - 2\n  m: {x: 1, y: 2}   # keep\nb: 3\n"
    out = set_values(text, {"a.ks": [4, 8], "a.m.y": 5, "b": None})
    assert yaml.safe_load(out) == {"a": {"ks": [4, 8], "m": {"x": 1, "y": 5}}, "b": None}
    assert "# keep" in out


def test_the_recipes_page_is_current() -> None:
    assert (ROOT / "docs" / "recipes.md").read_text() == recipes_markdown(), (
        "run: langdml recipe --docs > docs/recipes.md"
    )


def test_a_recipe_rewrites_only_the_lines_whose_value_it_changes(tmp_path: Path) -> None:
    """The DivE recipe keeps imagetext.train.lr at 1.0e-3, so that line keeps its spelling (not 0.001) and its
    comment; the lines it changes are the only ones that differ."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text().splitlines()
    changed = apply_recipe(params, "dive/coco-butd-bigru")
    after = params.read_text().splitlines()
    assert "    lr: 1.0e-3" in after and len(before) == len(after)
    differing = [b for b, a in zip(before, after, strict=True) if a != b]
    assert len(differing) == len(changed)  # one line per changed value (recipe's own record line included)
