"""Studies: a grid of rows x seeds run as named DVC experiments, and the table made from them.

A study is a YAML file (``stages/core/studies/<family>/<name>.yaml``, beside the recipes, or any path):

```yaml
version: 1
title: what it compares
recipe: roth22/cub200-rn512-ms-plg   # optional: every row starts from this recipe's values
seeds: [0, 1, 2]
baseline: no-language                # the row the paired differences are taken against
controls: [shuffled, uniform]        # rows that are controls (marked in the table)
metrics: [recall@1, map@r]           # metrics of the experiments (dvc exp show names; `pretrained/...` too)
rows:                                # row -> the params it sets (dotted keys, as `dvc exp run -S`)
  no-language: {omega: 0.0}
  elg: {omega: 3.0}
paper:                               # optional, paper studies: row -> the paper's number and where it is
  elg: {recall@1: 67.3, source: "Table 1, ResNet50 512-d"}
targets: [evaluate]                  # optional: the stages each run reproduces up to (default: the whole DAG)
scale: 100                           # optional: the table's factor (100: fractions as percent; 1: already percent)
```

``queue_commands`` gives one ``dvc exp run --queue --name <study>--<row>--s<seed> -S ...`` per run (each a
real experiment: ``dvc exp show`` lists it, ``dvc exp apply`` restores it; ``dvc queue start -j N`` runs them),
seed by seed, so a queue stopped early leaves every row with the same seeds.
``summarize`` turns the experiments' rows (``dvc.api.exp_show``) into per-row mean, sample std (ddof 1) and
the paired same-seed difference to the baseline with its std; a run that is missing or failed, and an
experiment of this study whose params are not its row's (another commit or an edited study), are named, never
silently averaged.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stages.core.errors import LangdmlError
from stages.core.io import read_text

STUDIES = Path(__file__).parent / "studies"
FIELDS = ("version", "title", "seeds", "baseline", "metrics", "rows")  # what every study file has
_NAME = re.compile(r"[^a-z0-9_-]+")


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    seeds: list[int]
    baseline: str
    metrics: list[str]
    rows: dict[str, dict[str, Any]]  # row -> dotted param -> value
    controls: list[str] = field(default_factory=list)
    recipe: str | None = None
    paper: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)  # the stages each run reproduces up to; empty: all
    scale: float = 100.0  # the table's factor: 100 shows fractions as percent

    @property
    def stem(self) -> str:
        """The experiment-name prefix: the study's file name, lower-case, safe for a git ref."""
        return _NAME.sub("-", Path(self.name).stem.lower()).strip("-")

    def experiment(self, row: str, seed: int) -> str:
        return f"{self.stem}--{_NAME.sub('-', row.lower())}--s{seed}"


def study_names() -> list[str]:
    return sorted(p.relative_to(STUDIES).with_suffix("").as_posix() for p in STUDIES.rglob("*.yaml"))


def load_study(name: str) -> Study:
    """A shipped study by name, or a study file by path (``.yaml``); a malformed one is one line naming it."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDIES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(study_names()) or "none"
        raise LangdmlError(f"unknown study {name!r}; known: {known} (or give a study file's path)")
    from stages.core.recipe import read_fields

    raw = read_fields(path, f"study {name}", FIELDS)
    unknown = sorted(set(raw) - {*FIELDS, "controls", "recipe", "paper", "targets", "scale"})
    if unknown:
        raise LangdmlError(f"study {name}: unknown field(s) {', '.join(unknown)}")
    rows = raw["rows"]
    if not isinstance(rows, dict) or not rows or not all(isinstance(v, dict) for v in rows.values()):
        raise LangdmlError(f"study {name}: rows must map each row's name to the params it sets")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise LangdmlError(f"study {name}: seeds must be a list of whole numbers >= 0")
    scale = raw.get("scale", 100.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
        raise LangdmlError(f"study {name}: scale must be a number > 0 (100: fractions shown as percent)")
    for key in (raw["baseline"], *raw.get("controls", []), *raw.get("paper", {})):
        if key not in rows:
            raise LangdmlError(f"study {name}: {key!r} is not one of its rows ({', '.join(rows)})")
    return Study(
        name=name,
        title=str(raw["title"]),
        seeds=list(seeds),
        baseline=str(raw["baseline"]),
        metrics=[str(m) for m in raw["metrics"]],
        rows={str(k): {str(p): v for p, v in dict(v).items()} for k, v in rows.items()},
        controls=[str(c) for c in raw.get("controls", [])],
        recipe=raw.get("recipe"),
        targets=[str(s) for s in raw.get("targets", [])],
        paper={str(k): dict(v) for k, v in raw.get("paper", {}).items()},
        scale=float(scale),
    )


def run_params(study: Study, row: str, seed: int) -> dict[str, Any]:
    """Every param one run sets: the recipe's values, then the row's, then the seed."""
    values: dict[str, Any] = {}
    if study.recipe:
        from stages.core.recipe import load_recipe

        values.update(load_recipe(study.recipe).params)
    return {**values, **study.rows[row], "seed": seed}


def check_params(study: Study, params_path: Path) -> None:
    """Every run's params, written over ``params_path``, validate (one line naming the row and the key)."""
    from stages.core.config import parse_params
    from stages.core.recipe import _assign

    base = yaml.safe_load(read_text(params_path)) or {}
    for row in study.rows:
        raw = yaml.safe_load(yaml.safe_dump(base))
        for key, value in run_params(study, row, study.seeds[0]).items():
            _assign(raw, key.split("."), value)
        try:
            parse_params(raw, f"study {study.name}, row {row}")
        except LangdmlError as err:
            raise LangdmlError(str(err)) from None


def queue_commands(
    study: Study, copy: tuple[str, ...] = (), rows: list[str] | None = None, seeds: list[int] | None = None
) -> list[list[str]]:
    """One ``dvc exp run --queue`` per row and seed (values as YAML, as ``-S`` parses them), or only ``rows`` /
    ``seeds`` of the study (one row re-run, a row added later). ``copy``: untracked folders a queued run needs
    (it runs in a copy of the last commit), passed as ``-C`` (``data/raw``)."""
    for row in rows or []:
        if row not in study.rows:
            raise LangdmlError(f"study {study.name}: no row {row!r}; its rows: {', '.join(study.rows)}")
    for seed in seeds or []:
        if seed not in study.seeds:
            raise LangdmlError(f"study {study.name}: no seed {seed}; its seeds: {', '.join(map(str, study.seeds))}")
    commands = []
    for seed in seeds or study.seeds:
        for row in rows or study.rows:
            sets = [f"{k}={_flow(v)}" for k, v in run_params(study, row, seed).items()]
            cmd = ["dvc", "exp", "run", "--queue", "--name", study.experiment(row, seed)]
            cmd += [arg for c in copy for arg in ("-C", c)]
            commands.append(cmd + [arg for s in sets for arg in ("-S", s)] + study.targets)
    return commands


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class Collected:
    values: dict[tuple[str, int], dict[str, float]]  # (row, seed) -> metric -> value
    problems: list[str]  # missing, failed or mismatched runs, one line each
    commits: dict[str, int] = field(default_factory=dict)  # baseline commit -> runs of it in the table


def collect(study: Study, experiments: list[dict[str, Any]]) -> Collected:
    """This study's runs among ``experiments`` (``dvc.api.exp_show`` rows, each commit's baseline row before its
    experiments, newest commit first): their metrics by (row, seed). A name run at several commits counts
    once, from the newest."""
    by_name: dict[str, dict[str, Any]] = {}
    commit_of: dict[str, str] = {}
    commit = "?"
    for e in experiments:
        if e.get("typ") == "baseline":
            commit = str(e.get("rev"))
        name = e.get("Experiment")
        if name and name not in by_name:
            by_name[name], commit_of[name] = e, commit
    values: dict[tuple[str, int], dict[str, float]] = {}
    problems: list[str] = []
    commits: dict[str, int] = {}
    for row in study.rows:
        for seed in study.seeds:
            name = study.experiment(row, seed)
            exp = by_name.get(name)
            if exp is None:
                problems.append(f"{name}: not found (queue it with `langdml study {study.name}`)")
                continue
            state = exp.get("State")
            if state not in (None, "Success"):
                problems.append(f"{name}: {str(state).lower()}")
                continue
            wrong = [k for k, v in run_params(study, row, seed).items() if k in exp and not _equal(exp[k], v)]
            if wrong:
                problems.append(f"{name}: its {wrong[0]} is {exp[wrong[0]]!r}, not the study's; an older run?")
                continue
            absent = [m for m in study.metrics if not isinstance(exp.get(m), int | float)]
            if absent:
                problems.append(f"{name}: no metric {absent[0]}")
                continue
            values[row, seed] = {m: float(exp[m]) for m in study.metrics}
            commits[commit_of[name]] = commits.get(commit_of[name], 0) + 1
    return Collected(values, problems, commits)


def _equal(shown: Any, value: Any) -> bool:
    """dvc.api.exp_show gives numbers as floats and everything else as its str()."""
    if isinstance(value, bool) or value is None or isinstance(value, str | list | dict):
        return str(shown) == str(value)
    try:
        return float(shown) == float(value)
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class RowSummary:
    row: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]  # sample std (ddof 1); nan with one seed
    diff_mean: dict[str, float]  # paired (same seed) row - baseline; nan for the baseline or no shared seed
    diff_std: dict[str, float]


def summarize(study: Study, collected: Collected) -> list[RowSummary]:
    out = []
    base = {s: v for (r, s), v in collected.values.items() if r == study.baseline}
    for row in study.rows:
        runs = {s: v for (r, s), v in collected.values.items() if r == row}
        seeds = sorted(runs)
        mean, std, dmean, dstd = {}, {}, {}, {}
        for m in study.metrics:
            x = np.array([runs[s][m] for s in seeds], dtype=np.float64)
            mean[m] = float(x.mean()) if len(x) else float("nan")
            std[m] = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
            shared = [s for s in seeds if s in base] if row != study.baseline else []
            d = np.array([runs[s][m] - base[s][m] for s in shared], dtype=np.float64)
            dmean[m] = float(d.mean()) if len(d) else float("nan")
            dstd[m] = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
        out.append(RowSummary(row, seeds, mean, std, dmean, dstd))
    return out


def _cell(mean: float, std: float, scale: float, signed: bool = False) -> str:
    """``mean ± std`` at two decimals; ``signed`` (a difference) always shows its sign."""
    if np.isnan(mean):
        return "-"
    shown = f"{mean * scale:+.2f}" if signed else f"{mean * scale:.2f}"
    return shown if np.isnan(std) else f"{shown} ± {std * scale:.2f}"


def markdown(
    study: Study, summary: list[RowSummary], problems: list[str], commits: dict[str, int] | None = None
) -> str:
    """The table: mean ± std over seeds and the paired difference to the baseline (both x the study's scale),
    the paper's number where the study gives one, the commit(s) the runs were made at (several: their code may
    differ), and every problem named below it."""
    scale = study.scale
    paper = bool(study.paper)
    head = ["row", "seeds", *study.metrics, *(f"Δ {m}" for m in study.metrics), *(["paper"] if paper else [])]
    lines = [f"**{study.title}** (`{study.name}`; x{scale:g}, mean ± std over seeds, Δ: paired with the same seed)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        label = (
            f"{s.row} (baseline)"
            if s.row == study.baseline
            else f"{s.row} (control)"
            if s.row in study.controls
            else s.row
        )
        cells = [label, ",".join(map(str, s.seeds)) or "-"]
        cells += [_cell(s.mean[m], s.std[m], scale) for m in study.metrics]
        cells += [_cell(s.diff_mean[m], s.diff_std[m], scale, signed=True) for m in study.metrics]
        if paper:
            p = study.paper.get(s.row, {})
            cells.append(", ".join(f"{k} {v} ({p.get('source', '?')})" for k, v in p.items() if k != "source") or "")
        lines.append("| " + " | ".join(cells) + " |")
    if commits:
        made = ", ".join(f"{c} ({n} runs)" for c, n in commits.items())
        lines += [
            "",
            f"Runs made at commit {made}"
            if len(commits) == 1
            else f"Runs made at {len(commits)} commits, whose code may differ: {made}",
        ]
    if problems:
        lines += ["", "Not in the table:", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def csv_text(study: Study, summary: list[RowSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["row", "n_seeds", *(f"{k}_{m}" for m in study.metrics for k in ("mean", "std", "diff_mean", "diff_std"))]
    )
    for s in summary:
        values = [v for m in study.metrics for v in (s.mean[m], s.std[m], s.diff_mean[m], s.diff_std[m])]
        writer.writerow([s.row, len(s.seeds), *(f"{v:.8g}" for v in values)])
    return out.getvalue()


def plot(study: Study, summary: list[RowSummary], path: Path) -> None:
    """Each row's mean with its std as an error bar (a point, on an axis fitted to the rows, so differences of a
    point or two show), one panel per metric, the baseline's mean as a dashed line; rows without runs are
    left empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.core.io import atomic_path

    scale = study.scale
    fig, axes = plt.subplots(1, len(study.metrics), figsize=(4.5 * len(study.metrics), 0.8 + 0.4 * len(summary)))
    axes = np.atleast_1d(axes)
    names = [s.row for s in summary]
    for ax, m in zip(axes, study.metrics, strict=True):
        for y, s in enumerate(summary):
            if np.isnan(s.mean[m]):
                continue
            colour = "tab:gray" if s.row == study.baseline else "tab:orange" if s.row in study.controls else "tab:blue"
            err = 0.0 if np.isnan(s.std[m]) else s.std[m] * scale
            ax.errorbar(s.mean[m] * scale, y, xerr=err, fmt="o", color=colour, capsize=3)
        base = next((s.mean[m] for s in summary if s.row == study.baseline), float("nan"))
        if not np.isnan(base):
            ax.axvline(base * scale, color="black", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"{m} (x{scale:g}; mean ± std over seeds)")
    fig.suptitle(study.title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


HEADLINE = ("recall@1", "map@r", "rsum")  # the DML task's headline metrics and the image-text task's


def experiment_view(
    experiments: list[dict[str, Any]], param_keys: list[str], metrics: tuple[str, ...] = HEADLINE
) -> list[list[str]]:
    """What `dvc exp show` holds, cut to what a reader compares: a header, then one row per experiment (the
    workspace and commits by their rev): its name, the params whose values differ between the rows, and the
    ``metrics`` some row has. (`dvc exp show` without flags prints every param and metric: 273 columns.)"""
    varying = [k for k in param_keys if len({str(e.get(k)) for e in experiments}) > 1]
    shown = [m for m in metrics if any(isinstance(e.get(m), int | float) for e in experiments)]
    rows = [["experiment", *varying, *shown]]
    for e in experiments:
        name = e.get("Experiment") or e.get("rev") or "?"
        state = e.get("State")
        label = f"{name} ({str(state).lower()})" if state not in (None, "Success") else name
        values = [_show(e.get(k)) for k in varying]
        rows.append([label, *values, *(_show(e.get(m), metric=True) for m in shown)])
    return rows


def _show(value: Any, metric: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:g}"
    return str(value)


def markdown_rows(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows[1:])]) + "\n"
