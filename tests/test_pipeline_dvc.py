"""End to end: the real dvc.yaml in a temporary git repository, on tiny parameters.

Checks the contract a user relies on: `dvc repro` builds everything and writes the metrics JSON, and
`dvc exp run -S omega=...` re-runs only training and evaluation. The pipeline is reproduced once per test run
(:func:`reproduced`, shared by the xdist workers through a file lock); each test that changes it works on its own
copy, so the sweeps, the image-text sweep and the two recipes run side by side on two cores (longest first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import guards
import pytest
import yaml
from filelock import FileLock
from fixtures_datasets import fake_npm, make_cub, make_emoji_packages, make_precomp, tiny_jpeg

import stages.core.data.datasets.emoji as em
from stages.core.npm import integrity

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", "stages", "data/local"]
PRECOMPUTE = ["fetch_data", "prepare", "embed_text", "pseudo_labels", "evaluate_pretrained", "cache_images"]
IMAGETEXT = ["imagetext_prepare", "imagetext_features", "imagetext_train", "imagetext_evaluate"]
BIN = Path(sys.executable).parent


def _tiny_emoji(root: Path, tmp: Path) -> None:
    """The emoji folder as `langdml fetch-data` leaves it, from fixture tarballs and a fake npm; its receipt
    names the real packages, so the pipeline's fetch_data stage finds it complete and goes offline."""
    receipt = em._receipt()
    tarballs = make_emoji_packages(tmp / "registry")
    fake_npm(tmp / "bin", tmp / "registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")
        sources = {k: em.Package(p.name, p.version, integrity(tarballs[k])) for k, p in em.SOURCES.items()}
        mp.setattr(em, "SOURCES", sources)
        em.fetch_emoji(root)
    (root / em.RECEIPT).write_text(json.dumps(receipt))


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    env.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid"
    )
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    res = guards.run(cmd, cwd=cwd, env=_env())
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def dvc(repo: Path, *args: str) -> str:
    return _run([str(BIN / "dvc"), *args], repo)


def git(repo: Path, *args: str) -> str:
    exe = shutil.which("git")
    assert exe, "git is needed by DVC experiments"
    return _run([exe, *args], repo)


def recipe(repo: Path, name: str, overrides: list[str]) -> str:
    return _run([str(BIN / "langdml"), "recipe", name, *(a for kv in overrides for a in ("-S", kv))], repo)


def ran(out: str, *names: str) -> None:
    for stage in names:
        assert f"Running stage '{stage}'" in out, out[-3000:]


def skipped(out: str, *names: str) -> None:
    for stage in names:
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-3000:]


EXPERIMENT_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]+/(?P<name>[^/]+)$")


def finished(repo: Path, count: int) -> list[tuple[str, str]]:
    """Wait for ``count`` queued experiments to finish; their (name, git ref). It polls git's refs (milliseconds;
    `dvc queue status` costs a core for ~1 s each call), fails at once on a failed run, and returns once the queue
    also says nothing is left running (so `dvc exp show` sees them finished)."""

    def refs() -> list[str]:
        return git(repo, "for-each-ref", "refs/exps", "--format=%(refname)").split()

    def done() -> bool:
        current = refs()
        if any(ref.startswith("refs/exps/celery/failed") for ref in current):
            pytest.fail(f"a queued experiment failed:\n{dvc(repo, 'queue', 'status')}")
        return sum(bool(EXPERIMENT_REF.match(ref)) for ref in current) >= count

    guards.wait_until(done, f"{count} queued experiments", poll=1.0)
    guards.wait_until(lambda: "Running" not in dvc(repo, "queue", "status"), "the queue's last task", poll=2.0)
    return [(m["name"], ref) for ref in refs() if (m := EXPERIMENT_REF.match(ref))]


@dataclass(frozen=True)
class Reproduced:
    repo: Path  # read-only for tests: copy it (:func:`workspace`) before changing anything
    repro: str  # what `dvc repro` printed
    status: str  # what `dvc status` printed right after


def _new_repo(repo: Path) -> None:
    """The project's pipeline on tiny parameters in a new git + DVC repository (nothing committed yet)."""
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
    params["imagetext"]["data"]["max_images"] = None
    params["imagetext"]["model"].update(embed_dim=16, slot_depth=1)
    params["imagetext"]["train"].update(epochs=2, batch_size=8)
    params["imagetext"]["evaluate"].update(ks=[1, 2], queries=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    (repo / ".gitignore").write_text("/data/raw/\n__pycache__/\n")


def _build(repo: Path, scratch: Path) -> Reproduced:
    _new_repo(repo)
    _tiny_emoji(repo / "data/raw/emoji", scratch)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    out = dvc(repo, "repro")
    status = dvc(repo, "status")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    return Reproduced(repo, out, status)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """The tiny pipeline reproduced and committed once per test run: the first xdist worker to need it builds it,
    the other waits for it (under plain pytest the lock is uncontended)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder every worker's base temp lives in
    repo, log = shared / "dvc-base", shared / "dvc-base.json"
    with FileLock(str(shared / "dvc-base.lock")):
        if not log.is_file():
            done = _build(repo, shared / "dvc-base-scratch")
            log.write_text(json.dumps({"repro": done.repro, "status": done.status}))
    outputs = json.loads(log.read_text())
    return Reproduced(repo, outputs["repro"], outputs["status"])


def workspace(base: Reproduced, tmp_path: Path) -> Path:
    """A private copy of the reproduced repository (git, DVC cache, outputs and the untracked data)."""
    repo = tmp_path / "repo"
    shutil.copytree(base.repo, repo, symlinks=True)
    return repo


@pytest.mark.slow
def test_dvc_repro_builds_every_stage_and_leaves_nothing_to_do(reproduced: Reproduced) -> None:
    repo = reproduced.repo
    ran(reproduced.repro, *PRECOMPUTE, "train", "evaluate", *IMAGETEXT)
    xm = json.loads((repo / "data/imagetext/eval/metrics.json").read_text())
    assert set(xm) >= {"i2t/recall@1", "i2t/recall@2", "t2i/recall@1", "t2i/recall@2", "rsum"}
    assert 0 <= xm["rsum"] <= 400 and xm["n_images"] == 4
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "pretrained/recall@1"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["recall@1"] <= metrics["recall@2"] <= metrics["recall@4"] <= metrics["recall@8"]
    for png in ("gallery.png", "similarity.png"):
        assert (repo / "data/eval" / png).stat().st_size > 1000
    assert "Data and pipelines are up to date" in reproduced.status, reproduced.status


@pytest.mark.slow
def test_a_study_runs_through_the_dvc_queue_and_its_table_is_the_experiments_own(
    reproduced: Reproduced, tmp_path: Path
) -> None:
    """`langdml study` queues 2 rows x 2 seeds as named experiments, `dvc queue start` runs them, and `langdml
    table` gives each row's mean, std and paired difference: checked against the experiments' own metrics
    files (read from their git refs) computed here by hand."""
    import csv

    import numpy as np

    repo = workspace(reproduced, tmp_path)
    study = {
        "version": 1,
        "title": "tiny omega study",
        "seeds": [0, 1],
        "baseline": "off",
        "metrics": ["recall@1", "map@r"],
        "rows": {"off": {"omega": 0.0}, "on": {"omega": 2.0}},
        "targets": ["evaluate"],  # train and evaluate only: the search index is not what a table reads
    }
    (repo / "tiny.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    out = _run([str(BIN / "langdml"), "study", "tiny.yaml"], repo)
    assert "queued 4 experiments" in out
    dvc(repo, "queue", "start", "-j", "2")
    metrics = {name: json.loads(git(repo, "show", f"{ref}:data/eval/metrics.json")) for name, ref in finished(repo, 4)}
    assert sorted(metrics) == ["tiny--off--s0", "tiny--off--s1", "tiny--on--s0", "tiny--on--s1"]
    # each queued run is a copy of the commit with the untracked data copied along (-C data/raw): the manifests
    # are byte-identical there, so the precompute stages skip and training and evaluation run (the pretrained
    # control too where the seed differs from the commit's: its NMI k-means is seeded)
    for name in metrics:
        log = dvc(repo, "queue", "logs", name)
        skipped(log, "fetch_data", "prepare", "embed_text", "pseudo_labels", "cache_images")
        (skipped if name.endswith("--s0") else ran)(log, "evaluate_pretrained")
        ran(log, "train", "evaluate")
    assert len({m["pretrained/recall@1"] for m in metrics.values()}) == 1  # the pretrained control, carried over
    _run([str(BIN / "langdml"), "table", "tiny.yaml", "--out", "tables"], repo)
    rows = {r["row"]: r for r in csv.DictReader((repo / "tables" / "tiny.csv").open())}
    for key in ("recall@1", "map@r"):
        off = np.array([metrics[f"tiny--off--s{s}"][key] for s in (0, 1)])
        on = np.array([metrics[f"tiny--on--s{s}"][key] for s in (0, 1)])
        assert float(rows["off"][f"mean_{key}"]) == pytest.approx(off.mean(), abs=1e-7)
        assert float(rows["on"][f"std_{key}"]) == pytest.approx(on.std(ddof=1), abs=1e-7)
        assert float(rows["on"][f"diff_mean_{key}"]) == pytest.approx((on - off).mean(), abs=1e-7)
        assert float(rows["on"][f"diff_std_{key}"]) == pytest.approx((on - off).std(ddof=1), abs=1e-7)
    assert (repo / "tables" / "tiny.png").stat().st_size > 1000
    shown = dvc(repo, "exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep", "Experiment")
    assert all(name in shown for name in metrics)  # every run is a real experiment
    view = _run([str(BIN / "langdml"), "exp"], repo).splitlines()  # the readable view: what differs, headline metrics
    assert view[0].split(" | ")[1:3] == ["seed", "omega"]
    for name, m in metrics.items():
        assert any(line.startswith(f"| {name} |") and f"| {m['recall@1']:.4f} |" in line for line in view), name
    # the pictures are DVC plots: `dvc plots diff` puts two experiments' galleries side by side
    dvc(repo, "plots", "diff", "tiny--off--s0", "tiny--on--s0", "-o", "plots")
    page = (repo / "plots" / "index.html").read_text()
    for name in ("tiny--off--s0", "tiny--on--s0"):
        assert f'src="static/{name}_data_eval_gallery.png"' in page, name


@pytest.mark.slow
def test_a_papers_recipe_in_one_word_trains_and_reports_the_best_epoch(tmp_path: Path) -> None:
    """Scaled down to a tiny CUB-layout folder and offline models: it trains with Roth et al.'s multisimilarity,
    evaluates every epoch and reports the best epoch beside the final model. (Its own repository, the DML stages
    as the target, so it runs beside the shared build instead of after it.)"""
    repo = tmp_path / "repo"
    _new_repo(repo)
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
    recipe(repo, "roth22/cub200-rn512-ms-plg", scaled)
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written["recipe"] == "roth22/cub200-rn512-ms-plg@1" and written["train"]["loss"] == "multisimilarity_roth"
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "recipe")
    out = dvc(repo, "exp", "run", "evaluate")
    ran(out, "prepare", "embed_text", "pseudo_labels", "train", "evaluate")
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    assert {"recall@1", "best_epoch/epoch", "best_epoch/recall@1", "best_epoch/map@r"} <= set(metrics)
    per_epoch = (repo / "data/train/plots/metrics/test/recall@1.tsv").read_text().splitlines()
    assert len(per_epoch) == 3  # header + epochs 1 and 2


@pytest.mark.slow
def test_the_image_cache_stage_runs_then_training_reads_it(reproduced: Reproduced, tmp_path: Path) -> None:
    """The decoded-image cache: its stage runs, then training reads it; nothing upstream re-runs. (Training is the
    target: evaluation of a trained model is the sweep's and the study's to prove.)"""
    repo = workspace(reproduced, tmp_path)
    out = dvc(repo, "exp", "run", "-S", "train.image_cache.enabled=true", "train")
    skipped(out, "fetch_data", "prepare", "embed_text", "pseudo_labels")
    ran(out, "cache_images", "train")
    assert (repo / "data/image_cache/images.npy").is_file()


@pytest.mark.slow
def test_an_omega_sweep_reruns_only_training_and_evaluation(reproduced: Reproduced, tmp_path: Path) -> None:
    repo = workspace(reproduced, tmp_path)
    out = dvc(repo, "exp", "run", "-S", "omega=5.0")
    skipped(out, *PRECOMPUTE, *IMAGETEXT)
    ran(out, "train", "evaluate")
    diff = json.loads(dvc(repo, "metrics", "diff", "--all", "--json"))
    eval_diff = diff["data/eval/metrics.json"]
    assert set(eval_diff) >= {"recall@1", "map@r", "pretrained/recall@1"}
    assert eval_diff["pretrained/recall@1"]["diff"] == 0  # the control is not re-run by a sweep


@pytest.mark.slow
def test_dives_recipe_in_one_word_trains_the_bigru_tower_end_to_end(reproduced: Reproduced, tmp_path: Path) -> None:
    """DivE's official run on a tiny precomp folder (5 captions per image), sizes scaled down and the bundled GloVe
    50d in place of 840B-300d: the bi-GRU text tower trains on cached token ids; the DML stages are untouched."""
    repo = workspace(reproduced, tmp_path)
    make_precomp(repo / "data/raw/precomp")
    scaled = [
        "imagetext.data.root=data/raw/precomp",
        "imagetext.features.text_tower=bigru:glove:6B-50d",
        "imagetext.model.embed_dim=16",
        "imagetext.model.slot_head_dim=8",
        "imagetext.model.slot_depth=1",
        "imagetext.train.epochs=2",
        "imagetext.train.batch_size=4",
        "imagetext.evaluate.folds=null",
    ]
    recipe(repo, "dive/coco-butd-bigru", scaled)
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written["recipe"] == "dive/coco-butd-bigru@1" and written["imagetext"]["train"]["caption_drop"] == 0.2
    out = dvc(repo, "exp", "run")
    skipped(out, *PRECOMPUTE, "train", "evaluate")
    xm = json.loads((repo / "data/imagetext/eval/metrics.json").read_text())
    assert 0 <= xm["rsum"] <= 600 and xm["n_images"] == 4 and xm["n_captions"] == 20
    text = json.loads((repo / "data/imagetext/model/config.json").read_text())["text"]
    assert text["tower"] == "bigru:glove:6B-50d" and text["words_with_vectors"] == len(text["vocab"]) - 4
    # the official tokenizer and vocabulary rule: four special rows, no <mask> (caption drop masks with <unk>)
    assert text["tokenizer"] == "nltk" and text["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert "<mask>" not in text["vocab"] and text["mask_id"] == 3


@pytest.mark.slow
def test_an_image_text_sweep_reruns_its_own_training_in_two_processes(reproduced: Reproduced, tmp_path: Path) -> None:
    repo = workspace(reproduced, tmp_path)
    out = dvc(repo, "exp", "run", "-S", "imagetext.model.head=maxpool", "-S", "imagetext.train.nproc=2")
    skipped(out, *PRECOMPUTE, "train", "evaluate", "imagetext_prepare", "imagetext_features")
    ran(out, "imagetext_train", "imagetext_evaluate")


@pytest.mark.slow
def test_editing_a_file_that_a_param_names_makes_dvc_status_name_its_stages(
    reproduced: Reproduced, tmp_path: Path
) -> None:
    """Word vectors and local model folders live in the folders the params name (text.local_files,
    imagetext.features.local_files), and the gallery is index.gallery itself: each a dependency in dvc.yaml."""
    repo = workspace(reproduced, tmp_path)
    for n in range(2):
        tiny_jpeg(repo / "data/gallery/cats" / f"{n}.jpg", shade=40 * n)
    out = dvc(repo, "exp", "run", "-S", "index.gallery=data/gallery")
    ran(out, "index")
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    (repo / "data/local/text_towers/glove.txt").write_text("cat 0.1 0.2\n")
    (repo / "data/local/text_encoders/my-bert").mkdir()
    (repo / "data/local/text_encoders/my-bert/config.json").write_text("{}")
    tiny_jpeg(repo / "data/gallery/cats/2.jpg", shade=200)
    status = dvc(repo, "status", "--json")
    stale = {stage for stage, changes in json.loads(status).items() if changes}
    assert stale == {"embed_text", "pseudo_labels", "imagetext_features", "imagetext_train", "index"}, status
    for stage, folder in (("imagetext_features", "data/local/text_towers"), ("embed_text", "data/local/text_encoders")):
        assert {"changed deps": {folder: "modified"}} in json.loads(status)[stage], status
    assert {"changed deps": {"data/gallery": "modified"}} in json.loads(status)["index"], status
