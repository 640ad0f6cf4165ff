"""Load recipes (``stages/core/recipes/<family>/<name>.yaml``) and write their values into params.yaml.

The params file is edited line by line, so its comments and layout stay; a value the recipe sets must be a
key params.yaml already has (the recipe test checks every recipe against the default params.yaml). The new
file is validated before it replaces the old one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.core.config import parse_params
from stages.core.errors import LangdmlError, first_line
from stages.core.io import read_text, write_text

RECIPES = Path(__file__).parent / "recipes"
ROW_FIELDS = ("flag", "official", "param", "ours", "source")


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    title: str
    source: str
    params: dict[str, Any]  # dotted key -> value
    official: list[dict[str, Any]]  # the table rows
    notes: list[str]


BASE = "base"  # ``<family>/base.yaml``: what a family's recipes share (``extends``), not a recipe itself


def recipe_names() -> list[str]:
    names = (p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))
    return sorted(n for n in names if n.rpartition("/")[2] != BASE)


def load_recipe(name: str) -> Recipe:
    """The recipe ``name`` (a shipped recipe or family base, by name, never a path); one it ``extends`` gives
    the values and rows it does not set itself. A malformed file is one line naming it."""
    if name not in recipe_names() and name not in _bases():
        raise LangdmlError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    raw = read_fields(RECIPES / f"{name}.yaml", f"recipe {name}", ("version", "title", "source"))
    rows = list(raw.get("official", []))
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        extra = sorted(set(row) - {*ROW_FIELDS, "note"})
        if missing or extra:
            what = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(extra)}"
            raise LangdmlError(f"recipe {name}: a row of 'official' {what}: {row}")
    params = flatten(raw.get("params", {}))
    notes = list(raw.get("notes", []))
    if raw.get("extends"):
        parent = load_recipe(raw["extends"])
        own = {r["param"] for r in rows}
        params = {**parent.params, **params}
        rows = [r for r in parent.official if r["param"] not in own] + rows
        notes = parent.notes + notes
    try:
        version = int(raw["version"])
    except (TypeError, ValueError):
        raise LangdmlError(f"recipe {name}: version must be a whole number, got {raw['version']!r}") from None
    return Recipe(name, version, str(raw["title"]), str(raw["source"]), params, rows, notes)


def read_fields(path: Path, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    """A YAML file of named fields (a recipe, a study): one line naming ``what`` and the file when it is not
    valid YAML, not a mapping, or lacks a required field."""
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise LangdmlError(f"{what}: {path} is not valid YAML ({first_line(err)})") from None
    if not isinstance(raw, dict):
        raise LangdmlError(f"{what}: {path} is not a mapping of {what.split()[0]} fields")
    missing = [f for f in required if f not in raw]
    if missing:
        raise LangdmlError(f"{what}: {path} lacks {', '.join(missing)}")
    return raw


def _bases() -> list[str]:
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob(f"{BASE}.yaml"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted key (``train.lr``), as DVC and ``-S`` name params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def _render(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def set_values(text: str, values: dict[str, Any]) -> str:
    """``text`` (YAML) with each dotted key's value replaced in place (comments kept); a key that is not
    there, or whose value is a nested mapping, is an error naming it."""
    lines = text.splitlines()
    todo = dict(values)
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    skip_indent: int | None = None  # dropping the block list of a value that was replaced
    for line in lines:
        if skip_indent is not None:
            stripped = line.lstrip()
            if stripped.startswith("- ") or stripped == "-" or (stripped and len(line) - len(stripped) > skip_indent):
                continue
            skip_indent = None
        m = KEY_LINE.match(line)
        if not m or line.lstrip().startswith("#"):
            out.append(line)
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m["key"]])
        stack.append((indent, m["key"]))
        rest, comment, column = m["rest"], "", 0
        hash_at = rest.find(" #")
        if hash_at >= 0:  # keep the comment in its column
            rest, comment = rest[:hash_at], rest[hash_at:]
            column = len(line) - len(m["rest"]) + hash_at
        inner = [k for k in todo if k.startswith(path + ".")]
        if inner and rest.strip().startswith("{"):  # an inline mapping: set its keys, keep it inline
            mapping = yaml.safe_load(rest) or {}
            before = yaml.safe_load(rest) or {}
            for key in inner:
                _assign(mapping, key[len(path) + 1 :].split("."), todo.pop(key))
            new = _with_comment(f"{m['indent']}{m['key']}: {_render(mapping)}", comment, column)
            out.append(line if mapping == before else new)  # an unchanged value keeps its spelling
            continue
        if path not in todo:
            out.append(line)
            continue
        if rest.strip() and _same(rest, todo[path]):  # already this value: its line stays as written (1.0e-5)
            todo.pop(path)
            out.append(line)
            continue
        if not rest.strip():  # a block below: a nested mapping (refused) or a block list (replaced)
            skip_indent = indent
        out.append(_with_comment(f"{m['indent']}{m['key']}: {_render(todo.pop(path))}", comment, column))
    if todo:
        raise LangdmlError(f"params.yaml has no key {', '.join(sorted(todo))} (a recipe sets only existing keys)")
    return "\n".join(out) + "\n"


def _same(written: str, value: Any) -> bool:
    """Whether the YAML text ``written`` already holds ``value`` (and its type: 1 is not 1.0, nor true)."""
    try:
        old = yaml.safe_load(written)
    except yaml.YAMLError:
        return False
    return type(old) is type(value) and old == value


def _with_comment(line: str, comment: str, column: int) -> str:
    return f"{line.ljust(column)}{comment}" if comment else line


def _assign(mapping: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        mapping = mapping.setdefault(part, {})
    mapping[parts[-1]] = value


def apply_recipe(params_path: Path, name: str, overrides: dict[str, Any] | None = None) -> list[str]:
    """Write recipe ``name`` (then ``overrides``) into ``params_path``; the changed keys, ``old -> new``. Only
    the names ``langdml recipe`` lists: a family's ``base`` is no run of its own, and a path is no name."""
    if name not in recipe_names():
        raise LangdmlError(
            f"unknown recipe {name!r}: recipes are named, not paths; known: {', '.join(recipe_names())} "
            "(to run your own values, set them with `dvc exp run -S key=value`)"
        )
    recipe = load_recipe(name)
    values = {**recipe.params, **(overrides or {}), "recipe": f"{recipe.name}@{recipe.version}"}
    text = read_text(params_path)
    try:
        before = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LangdmlError(
            f"{params_path}: not valid YAML ({first_line(err)}); fix it before applying a recipe"
        ) from None
    new_text = set_values(text, values)
    parse_params(yaml.safe_load(new_text), str(params_path))  # one line naming a bad key, nothing written
    write_text(params_path, new_text)
    changed = []
    for key, value in values.items():
        old = _lookup(before, key)
        if old != value:
            changed.append(f"{key}: {old!r} -> {value!r}")
    return changed


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def recipes_markdown() -> str:
    """docs/recipes.md: every recipe's table (``langdml recipe --docs``; a test keeps the page in step)."""
    head = [
        "# Recipes: the papers' official runs in one word",
        "",
        "`langdml recipe NAME [-S key=value ...]` writes a recipe's values into params.yaml (comments kept), so",
        "DVC tracks every one of them; then `dvc exp run`. `langdml recipe` lists the names. Each table gives, per",
        "official flag, its value, our parameter and value, and where the official value comes from; a note says",
        "where ours differs. The page is generated from `stages/core/recipes/` (`langdml recipe --docs`), and",
        "`tests/test_recipes.py` checks that every recipe sets exactly what its table says and that this page is",
        "current.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(markdown(load_recipe(n)) for n in recipe_names())


def markdown(recipe: Recipe) -> str:
    """The recipe's table for docs/recipes.md."""
    lines = [
        f"## `{recipe.name}` (version {recipe.version})",
        "",
        f"{recipe.title}. Source: {recipe.source}.",
        "",
        "| official flag | official value | our parameter | our value | source | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in recipe.official:
        cells = [row["flag"], _render(row["official"]), row["param"], _render(row["ours"]), row["source"]]
        cells.append(row.get("note", ""))
        lines.append("| " + " | ".join(f"`{c}`" if i in (0, 2) else str(c) for i, c in enumerate(cells)) + " |")
    lines += [""] + [f"- {n}" for n in recipe.notes] + ([""] if recipe.notes else [])
    return "\n".join(lines) + "\n"
