"""Studies: loading, the queued experiments, and the table's statistics against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.core.errors import LangdmlError
from stages.core.study import (
    collect,
    csv_text,
    load_study,
    markdown,
    queue_commands,
    study_names,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, **changes) -> Path:
    raw = {
        "version": 1,
        "title": "toy",
        "seeds": [0, 1],
        "baseline": "off",
        "controls": ["ctl"],
        "metrics": ["recall@1"],
        "rows": {"off": {"omega": 0.0}, "on": {"omega": 2.0, "language.guidance": "plg"}, "ctl": {"omega": 2.0}},
        **changes,
    }
    path = tmp_path / "toy-study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _exp(name: str, recall: float, **params) -> dict:
    return {"Experiment": name, "State": "Success", "recall@1": recall, **params}


def test_each_run_is_one_named_queued_experiment(tmp_path: Path) -> None:
    targeted = queue_commands(load_study(str(_study(tmp_path, targets=["evaluate"]))), copy=("data/raw",))
    assert targeted[0][6:8] == ["-C", "data/raw"] and targeted[0][-1] == "evaluate"
    study = load_study(str(_study(tmp_path)))
    commands = queue_commands(study)
    assert len(commands) == 6
    assert [c[5] for c in commands[:3]] == ["toy-study--off--s0", "toy-study--on--s0", "toy-study--ctl--s0"]
    only = queue_commands(study, rows=["ctl"], seeds=[1])
    assert [c[5] for c in only] == ["toy-study--ctl--s1"]
    with pytest.raises(LangdmlError, match=r"no row 'nope'; its rows: off, on, ctl"):
        queue_commands(study, rows=["nope"])
    with pytest.raises(LangdmlError, match=r"no seed 7; its seeds: 0, 1"):
        queue_commands(study, seeds=[7])
    assert commands[1] == [
        "dvc", "exp", "run", "--queue", "--name", "toy-study--on--s0",
        "-S", "omega=2.0", "-S", "language.guidance=plg", "-S", "seed=0",
    ]  # fmt: skip


def test_the_table_is_mean_std_and_the_paired_difference_computed_by_hand(tmp_path: Path) -> None:
    study = load_study(str(_study(tmp_path)))
    experiments = [
        _exp("toy-study--off--s0", 0.40, omega=0.0, seed=0.0),
        _exp("toy-study--off--s1", 0.44, omega=0.0, seed=1.0),
        _exp("toy-study--on--s0", 0.45, omega=2.0, seed=0.0),
        _exp("toy-study--on--s1", 0.47, omega=2.0, seed=1.0),
        _exp("toy-study--ctl--s0", 0.41, omega=2.0, seed=0.0),
        {"Experiment": "toy-study--ctl--s1", "State": "Failed"},
        _exp("other--on--s0", 0.99),  # another study's run: ignored
    ]
    collected = collect(study, experiments)
    assert collected.problems == ["toy-study--ctl--s1: failed"]
    rows = {s.row: s for s in summarize(study, collected)}
    # by hand: off 0.40, 0.44 -> mean 0.42, std sqrt(((-0.02)^2 + 0.02^2) / 1) = 0.028284
    assert rows["off"].mean["recall@1"] == pytest.approx(0.42)
    assert rows["off"].std["recall@1"] == pytest.approx(0.0282843, abs=1e-6)
    # on - off, same seed: 0.05, 0.03 -> mean 0.04, std 0.014142
    assert rows["on"].diff_mean["recall@1"] == pytest.approx(0.04)
    assert rows["on"].diff_std["recall@1"] == pytest.approx(0.0141421, abs=1e-6)
    assert rows["ctl"].seeds == [0] and rows["ctl"].diff_mean["recall@1"] == pytest.approx(0.01)
    table = markdown(study, list(rows.values()), collected.problems)
    assert "| off (baseline) | 0,1 | 42.00 ± 2.83 | - |" in table
    assert "| on | 0,1 | 46.00 ± 1.41 | +4.00 ± 1.41 |" in table
    assert "| ctl (control) | 0 | 41.00 | +1.00 |" in table and "- toy-study--ctl--s1: failed" in table
    assert csv_text(study, list(rows.values())).splitlines()[2].startswith("on,2,0.46,0.014142136,0.04,0.014142136")


def test_a_name_run_at_two_commits_counts_once_from_the_newest_and_the_commits_are_named(tmp_path: Path) -> None:
    study = load_study(str(_study(tmp_path, scale=1)))
    experiments = [
        {"Experiment": None, "rev": "main", "typ": "baseline"},
        _exp("toy-study--off--s0", 40.0, omega=0.0, seed=0.0),
        {"Experiment": None, "rev": "b8a907a", "typ": "baseline"},
        _exp("toy-study--off--s0", 10.0, omega=0.0, seed=0.0),  # the same name at an older commit
        _exp("toy-study--on--s0", 45.0, omega=2.0, seed=0.0),
    ]
    collected = collect(study, experiments)
    assert collected.values[("off", 0)]["recall@1"] == 40.0
    assert collected.commits == {"main": 1, "b8a907a": 1}
    table = markdown(study, summarize(study, collected), collected.problems, collected.commits)
    assert "x1," in table and "| on | 0 | 45.00 | +5.00 |" in table  # scale 1: already percent
    assert "Runs made at 2 commits, whose code may differ: main (1 runs), b8a907a (1 runs)" in table
    with pytest.raises(LangdmlError, match="scale must be a number > 0"):
        load_study(str(_study(tmp_path, scale=0)))


def test_missing_and_stale_runs_are_named_not_averaged(tmp_path: Path) -> None:
    study = load_study(str(_study(tmp_path)))
    collected = collect(study, [_exp("toy-study--off--s0", 0.4, omega=1.0)])
    assert collected.values == {}
    assert collected.problems[0] == "toy-study--off--s0: its omega is 1.0, not the study's; an older run?"
    assert "toy-study--ctl--s1: not found" in collected.problems[-1] and len(collected.problems) == 6


def test_a_bad_study_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LangdmlError, match="unknown study 'nope'; known: dive/coco-butd-bigru-slots, emoji/dive-"):
        load_study("nope")
    with pytest.raises(LangdmlError, match=r"'gone' is not one of its rows \(off, on, ctl\)"):
        load_study(str(_study(tmp_path, baseline="gone")))
    with pytest.raises(LangdmlError, match="seeds must be a list of whole numbers"):
        load_study(str(_study(tmp_path, seeds=[-1])))


def test_the_shipped_studies_validate_on_the_projects_params() -> None:
    from stages.core.study import check_params

    assert study_names() == [
        "dive/coco-butd-bigru-slots",
        "emoji/dive-maxpool-lr",
        "emoji/dive-slots",
        "emoji/dive-slots-official",
        "emoji/dive-towers",
        "emoji/dml-dive",
        "emoji/language-controls",
        "roth22/cub200-rn512-table1",
    ]
    for name in study_names():
        check_params(load_study(name), ROOT / "params.yaml")


def test_the_experiment_view_shows_the_params_that_differ_and_the_headline_metrics() -> None:
    from stages.core.recipe import flatten
    from stages.core.study import experiment_view, markdown_rows

    keys = list(flatten({"seed": 0, "omega": 1.0, "train": {"lr": 1e-5, "epochs": 2}}))
    assert keys == ["seed", "omega", "train.lr", "train.epochs"]
    runs = [
        {"rev": "workspace", "seed": 0.0, "omega": 1.0, "train.lr": 1e-5, "train.epochs": 2, "recall@1": 0.5},
        {
            "Experiment": "a",
            "State": "Success",
            "seed": 0.0,
            "omega": 5.0,
            "train.lr": 1e-5,
            "train.epochs": 2,
            "recall@1": 0.61234,
            "map@r": 0.3,
        },
        {"Experiment": "b", "State": "Failed", "seed": 1.0, "omega": 5.0, "train.lr": 1e-5, "train.epochs": 2},
    ]
    rows = experiment_view(runs, keys)
    assert rows[0] == ["experiment", "seed", "omega", "recall@1", "map@r"]  # lr and epochs are the same everywhere
    assert rows[1:] == [
        ["workspace", "0", "1", "0.5000", "-"],
        ["a", "0", "5", "0.6123", "0.3000"],
        ["b (failed)", "1", "5", "-", "-"],
    ]
    assert markdown_rows(rows).splitlines()[1] == "|---|---|---|---|---|"
