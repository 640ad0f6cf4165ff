"""What happens when things go wrong (issue: reliability): each handled fault, checked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from fixtures_datasets import SOP_TRAIN, make_class_folders, make_cub, make_sop, params_for, tiny_jpeg, write_ebay
from fixtures_training import CLASS_NAMES, TinyImages, tiny_params, train_paths, write_class_embeddings
from guards import HANG_GUARD, communicate, process_gone, wait_until
from typer.testing import CliRunner

from stages.cli import app
from stages.core.config import load_params, parse_params
from stages.core.data.datasets.registry import build_manifests
from stages.core.data.train_images import DecodedImages
from stages.core.dml import objective as dml
from stages.core.dml.objective import train_dml
from stages.core.errors import LangdmlError
from stages.core.tables import read_parquet
from stages.lock import stage_lock

torch.set_num_threads(1)


def _fit(root: Path, **overrides):
    paths = train_paths(root)
    if not paths.class_embeddings.exists():
        write_class_embeddings(paths.class_embeddings)
    return train_dml(tiny_params(**overrides), DecodedImages(TinyImages), paths, class_names=CLASS_NAMES), paths


# --- logs survive a failed run; timings are not metrics; stale temporaries; file modes -------------------


def test_a_failed_run_keeps_the_previous_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, paths = _fit(tmp_path, train={"epochs": 1})
    before = {p: p.read_bytes() for p in paths.log_dir.rglob("*") if p.is_file()}
    assert paths.log_dir / "metrics.json" in before
    real = dml.language_matching
    monkeypatch.setattr(dml, "language_matching", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(LangdmlError, match="non-finite language loss at epoch 1/1, step 1"):
        _fit(tmp_path, train={"epochs": 1}, omega=2.0)  # a new config: starts fresh, fails in its first step
    after = {p: p.read_bytes() for p in paths.log_dir.rglob("*") if p.is_file()}
    assert after == before


def test_a_non_finite_loss_never_updates_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    real = dml.language_matching
    monkeypatch.setattr(dml, "language_matching", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(LangdmlError, match="step 1;"):
        _fit(tmp_path, train={"epochs": 1, "log_every": 100})
    assert steps == []  # checked before the first update, not every log_every steps


def test_timings_stay_out_of_the_tracked_metrics_and_stale_temporaries_go(tmp_path: Path) -> None:
    paths = train_paths(tmp_path)
    paths.checkpoint.parent.mkdir(parents=True)
    stale = paths.checkpoint.parent / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    result, paths = _fit(tmp_path, train={"epochs": 1})
    assert not stale.exists()
    assert "images_per_s" in result.history[0]  # still measured and logged
    metrics = json.loads((paths.log_dir / "metrics.json").read_text())
    assert "images_per_s" not in metrics and not (paths.log_dir / "plots" / "metrics" / "images_per_s.tsv").exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in paths.model_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors like config.json


# --- paths outside the dataset root ----------------------------------------------------------------------


def test_annotation_paths_must_stay_inside_the_root(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "cub", per_class=1)
    tiny_jpeg(tmp_path / "outside.jpg")
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " ../../outside.jpg"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LangdmlError, match=r"lead outside dataset.root .* e.g. 'images/../../outside.jpg'") as err:
        build_manifests(params_for("cub200", root).dataset)
    assert "\n" not in str(err.value)
    sop = make_sop(tmp_path / "sop")
    write_ebay(sop / "Ebay_train.txt", [*SOP_TRAIN[:-1], (3, 2, str(tmp_path / "outside.jpg"))])
    with pytest.raises(LangdmlError, match=r"lead outside dataset\.root"):
        build_manifests(params_for("sop", sop).dataset)


def test_folder_skips_symlinks_that_leave_the_root_and_counts_them(tmp_path: Path, caplog) -> None:
    root = make_class_folders(tmp_path / "data", {"cat": 2, "dog": 2, "eel": 2, "fox": 2})
    elsewhere = make_class_folders(tmp_path / "elsewhere", {"yak": 2})
    (root / "yak").symlink_to(elsewhere / "yak", target_is_directory=True)  # a class from outside
    (root / "cat" / "passwd.jpg").symlink_to("/etc/passwd")  # a file from outside
    (root / "dog" / "gone.jpg").symlink_to(root / "dog" / "missing.jpg")  # dangling
    out = build_manifests(params_for("folder", root).dataset)
    names = set(out.classes.column("class_name").to_pylist())
    assert names == {"cat", "dog", "eel", "fox"}
    assert not any("passwd" in p for p in out.train["path"].to_pylist() + out.test["path"].to_pylist())
    assert any("skipped 3 symlink(s)" in r.getMessage() for r in caplog.records)


def test_a_class_name_that_is_empty_after_cleaning_fails_in_prepare(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path, {"cat": 2, "___": 2, "dog": 2})
    with pytest.raises(LangdmlError, match="named '___', which is empty"):
        build_manifests(params_for("folder", root).dataset)


# --- validation that fails early; corrupt files ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"model": {"image_size": 1}}, "model.image_size: Input should be greater than or equal to 32"),
        ({"seed": 2**70}, "seed: Input should be less than 4294967296"),
        ({"omega": float("nan")}, "omega: Input should be a finite number"),
    ],
)
def test_bad_values_fail_at_load(raw: dict, match: str) -> None:
    with pytest.raises(LangdmlError, match=match):
        parse_params(raw)


def test_yaml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nomega: [1.0\ntrain: {}\n")
    with pytest.raises(LangdmlError, match=r"not valid YAML at line \d+, column \d+") as err:
        load_params(path)
    assert "\n" not in str(err.value)


def test_ks_beyond_the_gallery_fail_before_embedding() -> None:
    from stages.core.evaluation.metrics import check_ks

    with pytest.raises(LangdmlError, match=r"evaluate\.ks has 5000, but each query has only 999 other images"):
        check_ks([1, 5000], 999)
    assert check_ks([4, 1, 4], 999) == [1, 4]


def test_corrupt_parquet_and_safetensors_are_one_line(tmp_path: Path) -> None:
    from stages.core.artifacts import read_class_embeddings
    from stages.core.model import encoder as vision

    bad = tmp_path / "class_embeddings.parquet"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(LangdmlError, match=r"class_embeddings.parquet is unreadable .*langdml embed-text") as err:
        read_class_embeddings(bad)
    assert "\n" not in str(err.value)
    model_dir = tmp_path / "model"
    params = tiny_params()
    vision.save_model(vision.build_model(params.model), params.model, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LangdmlError, match=r"model.safetensors is unreadable .*langdml train") as err:
        vision.load_model(model_dir)
    assert "\n" not in str(err.value)


# --- one writer per stage; no orphans; Ctrl-C -----------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({}))
    with stage_lock("train"):
        result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert f"another `langdml train` (pid {os.getpid()}) is writing these outputs" in result.stderr
    assert "run `langdml prepare`" in CliRunner().invoke(app, ["train"]).stderr  # free again


def test_ctrl_c_is_one_line_saying_a_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import train

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({}))

    def interrupted(params) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 130
    assert len(result.stderr.strip().splitlines()) == 1 and "a rerun resumes" in result.stderr


# The child would sleep past the hang guard: only its parent's death can end it before the guard trips.
CHILD = textwrap.dedent(
    f"""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "from stages.lock import exit_with_parent; import time; "
                              "exit_with_parent(); print('ready', flush=True); time.sleep({2 * HANG_GUARD})"],
                             stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep({2 * HANG_GUARD})
    """
)


def test_a_stage_exits_when_the_process_that_launched_it_dies(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # as `kill -9` of dvc
    communicate(parent, "the killed parent")
    try:
        wait_until(lambda: process_gone(child_pid), "the child outlived its parent")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


def test_read_parquet_of_a_missing_file_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `langdml prepare`"):
        read_parquet(tmp_path / "none.parquet", stage="prepare")


def test_a_rerun_writes_a_byte_identical_checkpoint(tmp_path: Path) -> None:
    """No timing in the checkpoint: DVC records its hash in dvc.lock, which must not change for the same model."""
    _, a = _fit(tmp_path / "a", train={"epochs": 1, "deterministic": True})
    _, b = _fit(tmp_path / "b", train={"epochs": 1, "deterministic": True})
    assert a.checkpoint.read_bytes() == b.checkpoint.read_bytes()
