"""DDP on the CPU (gloo, 2 processes under torchrun): the same run as one process with the same global batch.

One process with global batch B and two processes with B/2 each must give the same losses and the same
weights (to float tolerance: the gathered batch is summed in another order), for multisimilarity + ELG;
a 2-process run killed and resumed must end like an uninterrupted 2-process run. BatchNorm is frozen
(per-rank batch statistics would differ by construction) and the tiny CNN has no dropout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures_training import train_paths, write_class_embeddings
from guards import run
from safetensors.torch import load_file

TESTS = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from fixtures_training import CLASS_NAMES, TinyImages, tiny_params, train_paths
    from stages.core.dml import objective as dml
    from stages.core.data.train_images import DecodedImages

    root, nproc, epochs, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    calls = 0
    real = dml.language_matching

    def maybe_kill(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at and os.environ.get("RANK", "0") == "0":
            os.kill(os.getppid(), signal.SIGKILL)  # the launcher, as a crashed node would be
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    dml.language_matching = maybe_kill
    params = tiny_params(
        model={{"freeze_bn": True}},
        train={{"epochs": epochs, "batch_size": 8, "samples_per_class": 2, "nproc": nproc, "deterministic": True}},
    )
    result = dml.train_dml(params, DecodedImages(TinyImages), train_paths(root))
    if os.environ.get("RANK", "0") == "0":
        print("resumed_from", result.resumed_from, flush=True)
    """
)


def _run(script: Path, root: Path, nproc: int, epochs: int, kill_at: int = -1) -> subprocess.CompletedProcess:
    paths = train_paths(root)
    if not paths.class_embeddings.exists():
        write_class_embeddings(paths.class_embeddings)
    args = [str(script), str(root), str(nproc), str(epochs), str(kill_at)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run(cmd, env=env)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER.format(tests=str(TESTS)))
    return path


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(train_paths(root).model_dir / "model.safetensors")


@pytest.mark.slow
def test_two_processes_equal_one_and_a_killed_pair_resumes_like_an_uninterrupted_run(
    tmp_path: Path, script: Path
) -> None:
    """Two processes with half the global batch each equal one process (losses of both epochs, final weights);
    the same pair killed in epoch 2 and rerun resumes from epoch 1's checkpoint and ends with the same weights."""
    one = _run(script, tmp_path / "one", 1, 2)
    clean = _run(script, tmp_path / "clean", 2, 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    ha = torch.load(train_paths(tmp_path / "one").checkpoint, weights_only=True)["history"]
    hb = torch.load(train_paths(tmp_path / "clean").checkpoint, weights_only=True)["history"]
    for epoch in (0, 1):
        for key in ("loss/dml", "loss/language", "loss/total"):
            assert hb[epoch][key] == pytest.approx(ha[epoch][key], rel=1e-5, abs=1e-7), (epoch, key)
    assert ha[0]["loss/language"] > 0

    killed = _run(script, tmp_path / "killed", 2, 2, kill_at=5)  # epoch 2, step 2 of 3 on rank 0
    assert killed.returncode != 0
    assert torch.load(train_paths(tmp_path / "killed").checkpoint, weights_only=True)["epoch"] == 1
    resumed = _run(script, tmp_path / "killed", 2, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed_from 1" in resumed.stdout and "resumed_from 0" in clean.stdout
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_the_sampler_gives_each_rank_its_share_of_the_same_global_batch() -> None:
    import numpy as np

    from stages.core.data.sampling import ClassBalancedBatchSampler

    labels = np.repeat(np.arange(6), 5)
    whole = list(ClassBalancedBatchSampler(labels, 2, 8, 3, seed=4))
    shares = [list(ClassBalancedBatchSampler(labels, 2, 8, 3, seed=4, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shares, strict=True)] == whole
    from stages.core.errors import LangdmlError

    with pytest.raises(LangdmlError, match=r"multiple of train\.nproc"):
        ClassBalancedBatchSampler(labels, 2, 8, 3, seed=4, rank=0, world=3)


def test_nproc_must_divide_the_global_batch() -> None:
    from stages.core.config import parse_params
    from stages.core.errors import LangdmlError

    with pytest.raises(LangdmlError, match=r"batch_size \(40\) must be a multiple of nproc \(3\)"):
        parse_params({"train": {"nproc": 3}})


@pytest.mark.slow
def test_langdml_train_relaunches_itself_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.nproc: 2` through the command in dvc.yaml: the CLI starts torchrun, the workers train, rank 0
    writes the model; the launcher holds the stage lock, the workers do not take it."""
    import yaml
    from test_training import test_train_stage_on_a_manifest
    from typer.testing import CliRunner

    from stages import paths
    from stages.cli import app

    test_train_stage_on_a_manifest(tmp_path, monkeypatch)  # a manifest, caches and a 1-process model
    paths.MODEL_WEIGHTS.unlink()
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["train"].update({"nproc": 2, "epochs": 2})
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert paths.MODEL_WEIGHTS.is_file()
    assert torch.load(paths.CHECKPOINT_FILE, weights_only=True)["epoch"] == 2


IMAGETEXT_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from test_imagetext_pipeline import _toy_data
    from stages.core.config.imagetext import ImageTextModelParams, ImageTextTrainParams
    from stages.core.imagetext.objective import ImageTextPaths, train_imagetext

    root = Path(sys.argv[1])
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)
    tp = ImageTextTrainParams(epochs=2, batch_size=5, lr=3e-3, warmup_epochs=1, device="cpu")
    paths = ImageTextPaths(root / "model", root / "ckpt" / "last.pt", root / "logs")
    train_imagetext(_toy_data(), mp, tp, 0, paths, [])
    """
)


@pytest.mark.slow
def test_imagetext_two_processes_equal_one(tmp_path: Path) -> None:
    """6 images (12 captions) in global batches of 5 images: uneven shares (3 + 2 images, 5 + 5 captions), a
    warm-up and a hardest epoch."""
    script = tmp_path / "imagetext_worker.py"
    script.write_text(IMAGETEXT_WORKER.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])):
        res = run([sys.executable, *launcher, str(script), str(tmp_path / name)], env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    ha, hb = (torch.load(tmp_path / n / "ckpt" / "last.pt", weights_only=True)["history"] for n in ("one", "two"))
    for row_a, row_b in zip(ha, hb, strict=True):
        for key in ("loss/triplet", "loss/mmd", "loss/diversity", "loss/total"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-6), key
