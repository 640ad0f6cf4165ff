"""The benchmarks' probe (benchmarks/probe/sitecustomize.py): which processes it records, what it records, and
the random-weights patch of the dry runs. No timing is checked."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest

PROBE = Path(__file__).resolve().parents[1] / "benchmarks" / "probe" / "sitecustomize.py"


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langdml_probe", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # pytest is no stage process: installs nothing
    return module


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/v/bin/python", "/v/bin/langdml", "train", "--params", "params.yaml"], "train"),
        (["/v/bin/python", "-m", "stages.cli", "imagetext-train"], "imagetext-train"),  # a torchrun worker
        (["/v/bin/python", "/v/bin/dvc", "repro"], None),
        (["/v/bin/python", "-c", "import stages.cli"], None),
    ],
)
def test_the_probe_records_only_stage_processes(
    probe: ModuleType, monkeypatch: pytest.MonkeyPatch, argv: list[str], command: str | None
) -> None:
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert probe._stage_command() == command


def test_a_record_holds_the_command_rank_memory_and_the_epoch_rows(
    probe: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rows = probe._Rows()
    logger = logging.getLogger("test_probe_rows")
    logger.addHandler(rows)
    logger.setLevel(logging.INFO)
    logger.info("epoch 1/1", extra={"row": {"epoch": 1, "images_per_s": 12.5}})
    logger.info("a line without a row")
    probe._record(tmp_path / "records", "train", rows)
    (written,) = (tmp_path / "records").glob("*.json")
    record = json.loads(written.read_text())
    assert record["command"] == "train"
    assert (record["rank"], record["workers"]) == (1, 2)
    assert record["rows"] == [{"epoch": 1, "images_per_s": 12.5}]
    assert record["seconds"] >= 0 and record["peak_mb"] > 0


def test_random_weights_drop_the_pretrained_weights_of_timm_and_open_clip(
    probe: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in packages named timm and open_clip, found first on sys.path: once imported through the finder,
    their constructors never see a request for pretrained weights."""
    (tmp_path / "timm.py").write_text("def create_model(name, *args, **kwargs):\n    return name, kwargs\n")
    (tmp_path / "open_clip.py").write_text("def create_model(name, *args, **kwargs):\n    return name, kwargs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", [probe._RandomWeights(), *sys.meta_path])
    real = {name: sys.modules.pop(name, None) for name in ("timm", "open_clip")}
    try:
        import open_clip
        import timm

        assert timm.create_model("resnet50", pretrained=True, num_classes=0) == (
            "resnet50",
            {"pretrained": False, "num_classes": 0},
        )
        assert open_clip.create_model("ViT-B-32", pretrained="openai", require_pretrained=True) == ("ViT-B-32", {})
    finally:  # the real packages back for the worker's other tests
        for name, module in real.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
