"""The prepared GPU check runs on a CPU too: it measures what it can and marks the GPU sections skipped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import guards
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: on a GPU machine the check is the full one")
def test_the_gpu_check_runs_on_a_cpu_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = guards.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), str(out), "--quick"], cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["devices"] == [] and result["environment"]["importable"]["torch"]
    assert "passed" in result["tests"]["summary"] or "skipped" in result["tests"]["summary"]
    measured = {k: v for k, v in result["model_only"].items() if isinstance(v, dict)}
    assert measured and all(v["images_per_s"] > 0 for v in measured.values())
    assert "no CUDA device" in result["full_stage"]["skipped"]
    assert result["evaluation"]["device"] == "cpu" and result["evaluation"]["retrieval_metrics_s"] > 0
    assert "DDP needs 2" in result["ddp"]["skipped"]
    assert not list(tmp_path.glob("*.partial"))
    assert subprocess.run(["git", "status", "--short"], cwd=REPO, capture_output=True, text=True).returncode == 0
