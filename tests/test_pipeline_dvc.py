"""End to end: the real dvc.yaml in a temporary git repository, on tiny parameters.

Checks the contract a user relies on: `dvc repro` builds everything and writes the metrics JSON, and
`dvc exp run -S omega=...` re-runs only training and evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_datasets import fake_npm, make_emoji_packages

import stages.core.data.datasets.emoji as em

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", "stages"]
PRECOMPUTE = ["fetch_data", "prepare", "embed_text", "pseudo_labels", "evaluate_pretrained", "cache_images"]
CROSSMODAL = ["xm_prepare", "xm_features", "xm_train", "xm_evaluate"]


def _tiny_emoji(root: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emoji folder as `langdml fetch-data` leaves it, from fixture tarballs and a fake npm; its receipt
    names the real packages, so the pipeline's fetch_data stage finds it complete and goes offline."""
    receipt = em._receipt()
    tarballs = make_emoji_packages(tmp / "registry")
    fake_npm(tmp / "bin", tmp / "registry")
    monkeypatch.setenv("PATH", f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sources = {k: em.Package(p.name, p.version, em._integrity(tarballs[k])) for k, p in em.SOURCES.items()}
    monkeypatch.setattr(em, "SOURCES", sources)
    em.fetch_emoji(root)
    (root / em.RECEIPT).write_text(json.dumps(receipt))


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


@pytest.mark.slow
def test_dvc_repro_then_sweep_reruns_only_train_and_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"]["max_per_class"] = 12
    params["pseudo_labels"].update(batch_size=32, num_workers=0)
    params["model"]["image_size"] = 32
    params["train"].update(epochs=1, batch_size=16, samples_per_class=4, num_workers=0, log_every=2)
    params["evaluate"].update(num_workers=0, gallery_queries=4)
    params["crossmodal"]["data"]["max_images"] = None
    params["crossmodal"]["model"].update(embed_dim=16, slot_depth=1)
    params["crossmodal"]["train"].update(epochs=2, batch_size=8)
    params["crossmodal"]["evaluate"].update(ks=[1, 2], queries=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _tiny_emoji(repo / params["dataset"]["root"], tmp_path, monkeypatch)

    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
    )
    git = shutil.which("git")
    assert git, "git is needed by DVC experiments"
    _run([git, "init", "-q"], repo, env)
    _run([f"{bindir}/dvc", "init", "-q"], repo, env)
    _run([f"{bindir}/dvc", "config", "core.analytics", "false"], repo, env)
    (repo / ".gitignore").write_text("/data/raw/\n__pycache__/\n")
    _run([git, "add", "-A"], repo, env)
    _run([git, "commit", "-qm", "init"], repo, env)

    out = _run([f"{bindir}/dvc", "repro"], repo, env)
    for stage in [*PRECOMPUTE, "train", "evaluate", *CROSSMODAL]:
        assert f"Running stage '{stage}'" in out, out[-3000:]
    xm = json.loads((repo / "data/crossmodal/eval/metrics.json").read_text())
    assert set(xm) >= {"i2t/recall@1", "i2t/recall@2", "t2i/recall@1", "t2i/recall@2", "rsum"}
    assert 0 <= xm["rsum"] <= 400 and xm["n_images"] == 4
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    for key in (
        "recall@1",
        "recall@2",
        "recall@4",
        "recall@8",
        "map@r",
        "r_precision",
        "nmi",
        "pretrained/recall@1",
    ):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["recall@1"] <= metrics["recall@2"] <= metrics["recall@4"] <= metrics["recall@8"]
    for png in ("gallery.png", "similarity.png"):
        assert (repo / "data/eval" / png).stat().st_size > 1000

    status = _run([f"{bindir}/dvc", "status"], repo, env)
    assert "Data and pipelines are up to date" in status, status

    _run([git, "add", "-A"], repo, env)
    _run([git, "commit", "-qm", "baseline"], repo, env)
    out = _run([f"{bindir}/dvc", "exp", "run", "-S", "omega=5.0"], repo, env)
    for stage in [*PRECOMPUTE, *CROSSMODAL]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    for stage in ("train", "evaluate"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # A sweep on the cross-modal task re-runs its training and evaluation alone (here in 2 DDP processes).
    sweep = ["-S", "crossmodal.model.head=maxpool", "-S", "crossmodal.train.nproc=2"]
    out = _run([f"{bindir}/dvc", "exp", "run", *sweep], repo, env)
    for stage in [*PRECOMPUTE, "train", "evaluate", "xm_prepare", "xm_features"]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    for stage in ("xm_train", "xm_evaluate"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # The decoded-image cache: its stage runs, then training reads it; nothing upstream re-runs.
    out = _run([f"{bindir}/dvc", "exp", "run", "-S", "train.image_cache.enabled=true"], repo, env)
    for stage in [*PRECOMPUTE[:-1], *CROSSMODAL]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    for stage in ("cache_images", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert (repo / "data/image_cache/images.npy").is_file()
    # Queued and --temp experiments run in a copy of the commit: the untracked dataset folder travels with -C, and
    # the manifests (with a repo-relative root) are byte-identical there, so the precompute stages still skip.
    out = _run([f"{bindir}/dvc", "exp", "run", "--temp", "-C", "data/raw", "-S", "omega=0.5"], repo, env)
    for stage in PRECOMPUTE:
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    diff = json.loads(_run([f"{bindir}/dvc", "metrics", "diff", "--all", "--json"], repo, env))
    eval_diff = diff["data/eval/metrics.json"]
    assert set(eval_diff) >= {"recall@1", "map@r", "pretrained/recall@1"}
    assert eval_diff["pretrained/recall@1"]["diff"] == 0  # the control is not re-run by a sweep
    # A paper's recipe in one word, scaled down to a tiny CUB-layout folder and offline models: it trains with
    # Roth et al.'s multisimilarity, evaluates every epoch and reports the best epoch beside the final model.
    from fixtures_datasets import make_cub

    make_cub(repo / "data/raw/cub", per_class=6)
    scaled = [
        "dataset.root=data/raw/cub",
        "model.backbone=efficientnet-lite0",
        "model.image_size=32",
        "model.embed_dim=16",
        "pseudo_labels.classifier=efficientnet-lite0",
        "pseudo_labels.image_size=64",
        "text.encoder=sentence-transformers:all-MiniLM-L6-v2",
        "train.epochs=2",
        "train.batch_size=4",
    ]
    recipe = [f"{bindir}/langdml", "recipe", "roth22/cub200-rn512-ms-plg", *(a for kv in scaled for a in ("-S", kv))]
    _run(recipe, repo, env)
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written["recipe"] == "roth22/cub200-rn512-ms-plg@1" and written["train"]["loss"] == "multisimilarity_roth"
    _run([f"{bindir}/dvc", "exp", "run"], repo, env)
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    assert {"recall@1", "best_epoch/epoch", "best_epoch/recall@1", "best_epoch/map@r"} <= set(metrics)
    per_epoch = (repo / "data/train/plots/metrics/test/recall@1.tsv").read_text().splitlines()
    assert len(per_epoch) == 3  # header + epochs 1 and 2
    # DivE's official run in one word on a tiny precomp folder (5 captions per image), sizes scaled down and the
    # bundled GloVe 50d in place of 840B-300d: the bi-GRU text tower trains on cached token ids end to end.
    from fixtures_datasets import make_precomp

    make_precomp(repo / "data/raw/precomp")
    scaled = [
        "crossmodal.data.root=data/raw/precomp",
        "crossmodal.features.text_tower=bigru:glove:6B-50d",
        "crossmodal.model.embed_dim=16",
        "crossmodal.model.slot_head_dim=8",
        "crossmodal.model.slot_depth=1",
        "crossmodal.train.epochs=2",
        "crossmodal.train.batch_size=4",
        "crossmodal.evaluate.folds=null",
    ]
    _run([f"{bindir}/langdml", "recipe", "dive/coco-butd-bigru", *(a for kv in scaled for a in ("-S", kv))], repo, env)
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written["recipe"] == "dive/coco-butd-bigru@1" and written["crossmodal"]["train"]["caption_drop"] == 0.2
    out = _run([f"{bindir}/dvc", "exp", "run"], repo, env)
    for stage in ("train", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]
    xm = json.loads((repo / "data/crossmodal/eval/metrics.json").read_text())
    assert 0 <= xm["rsum"] <= 600 and xm["n_images"] == 4 and xm["n_captions"] == 20
    text = json.loads((repo / "data/crossmodal/model/config.json").read_text())["text"]
    assert text["tower"] == "bigru:glove:6B-50d" and text["words_with_vectors"] == len(text["vocab"]) - 5
