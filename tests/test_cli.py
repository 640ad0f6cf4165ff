"""The command line as a user meets it: stage commands in pipeline order naming the params they read, plain
help with flags shown as flags, --version, and a quiet search."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import yaml
from guards import run
from typer.testing import CliRunner

from stages.cli import STAGES, app

ROOT = Path(__file__).resolve().parents[1]


def test_stage_commands_follow_dvc_yaml_and_name_the_params_it_tracks() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert [module for module, _, _ in STAGES] == list(stages)  # pipeline order
    for module, _, params in STAGES:
        assert list(params) == stages[module]["params"], module
        help_text = CliRunner().invoke(app, [module.replace("_", "-"), "--help"]).stdout
        assert "Reads these params" in help_text and params[-1] in help_text


def test_help_shows_flags_as_flags_and_version_prints_the_version() -> None:
    help_text = CliRunner().invoke(app, ["search", "--help"]).stdout
    assert "--json " in help_text and "<bool>" not in help_text and "-v, --verbose" in help_text
    listing = CliRunner().invoke(app, ["--help"]).stdout
    commands = [
        line.split()[0] for line in listing.splitlines() if line.startswith("  ") and not line.startswith("   ")
    ]
    assert commands[commands.index("fetch-data") : commands.index("imagetext-index") + 1] == [
        m.replace("_", "-") for m, _, _ in STAGES
    ]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"langdml {version('langdml')}\n"


def test_search_prints_only_its_results(tmp_path: Path) -> None:
    """A fresh process, as a user runs it: results on stdout, nothing at all on stderr (no INFO lines, no
    progress bars); -v brings the logs back."""
    from test_serving import _setup

    _, _, files = _setup(tmp_path / "data")  # data/model and data/index, where `langdml search` looks
    cmd = [sys.executable, "-m", "stages.cli", "search", str(files[3]), "--k", "2"]
    quiet = run(cmd, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.splitlines()[0] == str(files[3]) and len(quiet.stdout.splitlines()) == 3
    loud = run([*cmd, "-v"], cwd=tmp_path)
    assert loud.returncode == 0 and "INFO" in loud.stderr and loud.stdout == quiet.stdout
