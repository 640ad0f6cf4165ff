"""Scratch DVC projects for the benchmarks that time stages: they run the pipeline through ``dvc repro``, never a
stage by hand, so what they time is what ``dvc repro`` / ``dvc exp run`` runs (dvc.yaml's commands, deps and
params), and this repository's experiments, cache and outputs are left alone.

A project is this working tree's pipeline (dvc.yaml, params.yaml, stages/, data/local; the files
tests/test_pipeline_dvc.py copies) in a new git + DVC repository. ``repro`` runs ``dvc repro`` there with the
probe (benchmarks/probe/sitecustomize.py) in every stage process and returns what the stages recorded: seconds,
peak RSS and the training loop's epoch rows per stage process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "probe"
PIPELINE = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", "stages", "data/local"]
BIN = Path(sys.executable).parent


def new_project(folder: Path, outputs: tuple[str, ...] = ()) -> Path:
    """The pipeline in ``folder`` as a new git + DVC repository; ``outputs`` (paths under data/, with dvc.lock)
    copied from this repository, so ``dvc repro`` finds those stages done; ``data/raw`` is linked, not copied."""
    folder.mkdir(parents=True)
    for name in [*PIPELINE, *(("dvc.lock",) if outputs else ())]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, folder / name)
    for name in outputs:
        src, dst = REPO / name, folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("data/raw"):
            dst.symlink_to(src, target_is_directory=src.is_dir())
        elif src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    _run(["git", "init", "-q"], folder)
    _run([str(BIN / "dvc"), "init", "-q"], folder)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], folder)
    return folder


def set_params(folder: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in the project's params.yaml (as ``dvc exp run -S key=value`` does)."""
    path = folder / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def repro(
    folder: Path, targets: list[str], *, single_item: bool = False, env: dict[str, str] | None = None
) -> tuple[int, str, list[dict[str, Any]]]:
    """``dvc repro [--single-item] TARGETS`` in the project (outputs not committed to its cache): its exit status,
    what it printed, and each stage process's probe record in the order they ended."""
    records = Path(tempfile.mkdtemp(prefix="probe-", dir=folder.parent))
    run_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROBE), os.environ.get("PYTHONPATH", "")) if p),
        "LANGDML_PROBE_DIR": str(records),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    cmd = [str(BIN / "dvc"), "repro", "--no-commit", *(["--single-item"] if single_item else []), *targets]
    done = subprocess.run(cmd, cwd=folder, env=run_env, capture_output=True, text=True, check=False)
    found = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    shutil.rmtree(records, ignore_errors=True)
    return done.returncode, done.stdout + done.stderr, found


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{done.stderr[-2000:]}")
