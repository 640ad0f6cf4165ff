"""Reliability, round two: the image-text inputs and the fault paths, each case one line or a counted skip.

Every test here failed before its fix (issue 19's probe): caption paths leaving the dataset root, empty
captions, duplicate files, a lock kept by orphaned DataLoader workers, another dataset's control, OS errors
as tracebacks, undecodable text, unreadable or non-finite inputs that surfaced late or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures_datasets import make_cub, params_for, tiny_jpeg, truncated_jpeg
from guards import communicate, run
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.core.config import load_params
from stages.core.config.imagetext import ImageTextDataParams
from stages.core.data.datasets.captions import CAPTION_DATASETS
from stages.core.data.datasets.registry import build_manifests
from stages.core.data.sampling import ClassBalancedBatchSampler
from stages.core.data.torch_dataset import ImageDataset
from stages.core.errors import LangdmlError
from stages.core.io import staging_directory
from stages.core.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _coco(root: Path, entries: list[dict]) -> ImageTextDataParams:
    for e in entries:
        folder = Path(e["filepath"])
        target = folder / e["filename"] if folder.is_absolute() else root / folder / e["filename"]
        if not target.exists():
            tiny_jpeg(target)
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    return ImageTextDataParams(name="coco", root=str(root))


def _entry(name: str, split: str, captions: list[str] | None = None, folder: str = "val2014") -> dict:
    texts = captions if captions is not None else [f"a photo of {name}", f"{name} again"]
    return {"filepath": folder, "filename": name, "split": split, "sentences": [{"raw": t} for t in texts]}


# --- 1, 3: caption files are confined to the dataset root, no file twice ------------------------------------


def test_caption_paths_that_leave_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    tiny_jpeg(tmp_path / "secret.png")
    params = _coco(root, [_entry("a.jpg", "train"), _entry("../../secret.png", "test")])
    with pytest.raises(LangdmlError, match=r"coco: 1 image path\(s\) of the test split lead outside dataset\.root"):
        CAPTION_DATASETS.get("coco")(params)
    elsewhere = tmp_path / "elsewhere"
    params = _coco(root, [_entry("a.jpg", "train"), _entry("b.jpg", "test", folder=str(elsewhere))])
    with pytest.raises(LangdmlError, match=r"lead outside dataset\.root"):
        CAPTION_DATASETS.get("coco")(params)


def test_a_file_listed_twice_in_a_split_is_refused(tmp_path: Path) -> None:
    params = _coco(tmp_path, [_entry("a.jpg", "train"), _entry("a.jpg", "train"), _entry("b.jpg", "test")])
    with pytest.raises(LangdmlError, match=r"duplicate entries: 1 image\(s\) listed more than once in the train"):
        CAPTION_DATASETS.get("coco")(params)


# --- 2, 7: empty captions and unreadable images are left out and counted ----------------------------------


def test_empty_captions_are_left_out_and_an_image_with_none_left_is_an_error(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    entries = [_entry("a.jpg", "train", ["a cat", "", "   "]), _entry("b.jpg", "test")]
    out = CAPTION_DATASETS.get("coco")(_coco(tmp_path, entries))
    assert out.captions["text"].to_pylist()[:1] == ["a cat"] and out.captions.num_rows == 3
    assert any("2 empty caption(s) left out" in r.getMessage() for r in caplog.records)
    entries = [_entry("a.jpg", "train", ["", " "]), _entry("b.jpg", "test")]
    with pytest.raises(LangdmlError, match=r"1 image\(s\) have no caption"):
        CAPTION_DATASETS.get("coco")(_coco(tmp_path, entries))


def test_precomp_blank_lines_are_left_out_and_the_rest_stay_with_their_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for stem, n in (("train", 2), ("testall", 2)):
        np.save(tmp_path / f"{stem}_ims.npy", rng.normal(size=(n, 3, 4)).astype(np.float32))
    (tmp_path / "train_caps.txt").write_text("one\n\nthree\nfour\n")  # 2 per image, image 0's second is blank
    (tmp_path / "testall_caps.txt").write_text("a\nb\nc\nd\n")
    out = CAPTION_DATASETS.get("precomp")(ImageTextDataParams(name="precomp", root=str(tmp_path)))
    train = out.captions.filter(np.asarray(out.captions["split"].to_pylist()) == "train")
    assert train["text"].to_pylist() == ["one", "three", "four"]
    assert train["image_id"].to_pylist() == [0, 1, 1]


def test_unreadable_image_files_are_left_out_and_counted(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    params = _coco(tmp_path, [_entry(n, "train") for n in ("a.jpg", "b.jpg", "c.jpg")] + [_entry("d.jpg", "test")])
    (tmp_path / "val2014" / "b.jpg").write_bytes(b"")  # zero bytes
    truncated_jpeg(tmp_path / "val2014" / "c.jpg")
    out = CAPTION_DATASETS.get("coco")(params)
    assert out.images["path"].to_pylist() == ["val2014/a.jpg", "val2014/d.jpg"]
    assert set(out.captions["image_id"].to_pylist()) == {0, 3}
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 unreadable image file(s) left out" in m for m in messages)
    assert any("2 image(s) without a readable file left out with their captions" in m for m in messages)
    (tmp_path / "val2014" / "d.jpg").write_bytes(b"")
    with pytest.raises(LangdmlError, match="the test split has no images"):
        CAPTION_DATASETS.get("coco")(params)


# --- 4: a killed stage with DataLoader workers can be rerun at once --------------------------------------

LOCK_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from torch.utils.data import DataLoader, Dataset
    from stages.lock import stage_lock

    class Slow(Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            with open(os.path.join({pids!r}, str(os.getpid())), "w"):
                pass
            time.sleep(0.5)
            return torch.zeros(1)

    os.chdir({work!r})
    with stage_lock("cache-images"):
        for _ in DataLoader(Slow(), batch_size=1, num_workers=2):
            print("working", flush=True)
            time.sleep(60)
    """
)


def test_a_stage_killed_with_live_dataloader_workers_can_be_rerun_at_once(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "holder.py"
    script.write_text(LOCK_HOLDER.format(root=str(ROOT), pids=str(pids), work=str(tmp_path)))
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "working"
        holder.send_signal(signal.SIGKILL)  # mid-work: the workers are still loading
        communicate(holder, "the killed lock holder")
        workers = [int(p.name) for p in pids.iterdir()]
        alive = [p for p in workers if Path(f"/proc/{p}").exists()]
        check = run(
            [
                sys.executable,
                "-c",
                f"import sys, os; sys.path.insert(0, {str(ROOT)!r}); os.chdir({str(tmp_path)!r});"
                "from stages.lock import stage_lock\nwith stage_lock('cache-images'): print('locked')",
            ],
        )
        assert check.stdout.strip() == "locked", check.stderr
        assert alive, "the check is only meaningful while the orphaned workers still live"
    finally:
        for p in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name), signal.SIGKILL)
        time.sleep(0.1)


# --- 5: the control must be of this test split -----------------------------------------------------------


def test_evaluate_refuses_the_control_of_another_test_split() -> None:
    from stages.core.dml.evaluate import check_control

    labels = np.repeat(np.arange(5), 3)
    check_control({"pretrained/n_queries": 15, "pretrained/n_skipped_queries": 0, "pretrained/n_classes": 5}, labels)
    other = {"pretrained/n_queries": 3784, "pretrained/n_skipped_queries": 0, "pretrained/n_classes": 953}
    with pytest.raises(
        LangdmlError, match=r"of another test split \(3784 images, 953 classes; this one has 15 and 5\)"
    ):
        check_control(other, labels)


# --- 6: one line instead of a traceback ------------------------------------------------------------------


def test_a_decompression_bomb_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    tiny_jpeg(tmp_path / "big.jpg", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then over twice the limit: a "bomb"
    table = pa.table({"path": ["big.jpg"], "image_bytes": pa.nulls(1, pa.binary()), "label": [0]})
    with pytest.raises(LangdmlError, match=r"cannot read image .*big\.jpg"):
        ImageDataset(table, tmp_path, None).load(0)


def test_precomp_splits_of_different_widths_are_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "train_ims.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "testall_ims.npy", np.zeros((2, 3, 6), np.float32))
    for stem in ("train", "testall"):
        (tmp_path / f"{stem}_caps.txt").write_text("a\nb\n")
    with pytest.raises(LangdmlError, match=r"train_ims\.npy: 4 channels, testall_ims\.npy: 6 channels"):
        CAPTION_DATASETS.get("precomp")(ImageTextDataParams(name="precomp", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.ENOSPC, "No space left on device [ENOSPC]"), (errno.EROFS, "Read-only file system [EROFS]")],
)
def test_a_full_disk_or_read_only_folder_is_one_line(tmp_path, monkeypatch, code: int, cause: str) -> None:
    import stages.lock
    from stages import imagetext_features

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({}))
    if code == errno.EROFS:  # the lock file itself cannot be written

        def read_only(stage: str):
            raise OSError(code, os.strerror(code), "data/.imagetext-features.lock")

        monkeypatch.setattr(stages.lock, "stage_lock", read_only)
    else:

        def full(params) -> None:
            raise OSError(code, os.strerror(code), "data/imagetext/.features.partial/image_tokens.npy")

        monkeypatch.setattr(imagetext_features, "run", full)
    result = CliRunner().invoke(app, ["imagetext-features"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("langdml imagetext-features: error: cannot write or lock data/"), (
        lines
    )
    assert cause in lines[0]


def test_a_checkpoint_that_is_not_a_dict_starts_fresh(tmp_path: Path, caplog) -> None:
    path = tmp_path / "last.pt"
    torch.save([1, 2, 3], path)
    assert load_checkpoint(path, "fp", {"params": {}}) is None
    assert any("not a langdml checkpoint (list)" in r.getMessage() for r in caplog.records)


def test_a_non_utf8_byte_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011")
    classes = root / "classes.txt"
    classes.write_bytes(classes.read_bytes().replace(b"Albatross", b"Albatr\xffss", 1))
    with pytest.raises(LangdmlError, match=r"classes.txt: not UTF-8 text: byte 0xff at line 1"):
        build_manifests(params_for("cub200", root).dataset)
    params = tmp_path / "params.yaml"
    params.write_bytes(b"seed: 1\n# caf\xe9\n")
    with pytest.raises(LangdmlError, match=r"params.yaml: not UTF-8 text: byte 0xe9 at line 2"):
        load_params(params)


# --- 8: precomp oddities ---------------------------------------------------------------------------------


def test_precomp_caption_counts_are_logged_and_non_finite_features_are_one_line(tmp_path: Path, caplog) -> None:
    import pyarrow as pa

    from stages.core.imagetext.features import save_precomputed_tokens

    caplog.set_level(logging.INFO)
    features = np.zeros((2, 3, 4), np.float32)
    np.save(tmp_path / "train_ims.npy", features)
    features[1, 2, 0] = np.nan
    np.save(tmp_path / "testall_ims.npy", features)
    (tmp_path / "train_caps.txt").write_text("a\nb\nc\nd\n")  # 2 per image
    (tmp_path / "testall_caps.txt").write_text("".join(f"{i}\n" for i in range(10)))  # 5 per image
    out = CAPTION_DATASETS.get("precomp")(ImageTextDataParams(name="precomp", root=str(tmp_path)))
    assert any(
        "captions per image differ between splits: {'train': 2, 'test': 5}" in r.getMessage() for r in caplog.records
    )
    images = pa.table({"path": out.images["path"]})
    with pytest.raises(LangdmlError, match=r"1 image\(s\) have NaN or inf .* row 1 of testall_ims.npy"):
        save_precomputed_tokens(images, str(tmp_path), tmp_path, chunk=3)


# --- 9, 10: small classes are said; a newline in a class name cannot break the report ----------------------


def test_classes_smaller_than_samples_per_class_are_one_log_line(caplog) -> None:
    caplog.set_level(logging.INFO)
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    ClassBalancedBatchSampler(labels, m=4, batch_size=8, num_batches=2, seed=0)
    assert any(
        "2 of 4 training classes have fewer than train.samples_per_class = 4 images (e.g. class 1 with 1)"
        in r.getMessage()
        for r in caplog.records
    )


def test_a_newline_in_a_class_name_stays_inside_its_markdown_row() -> None:
    import pyarrow as pa

    from stages.core.language.plg import markdown_report

    table = pa.table({"class_id": [0], "rank": [0], "imagenet_name": ["tabby\ncat"], "score": [0.5]})
    report = markdown_report(table, {0: "cat|\nkitten"}, 1, [], "probabilities")
    rows = [line for line in report.splitlines() if line.startswith("| 0 |")]
    assert rows == ["| 0 | cat\\| kitten | tabby cat (0.500) |"]


# --- 11, 12: staging folders: what a killed run left is removed, the mode is the usual one -----------------


def test_staging_folders_remove_a_killed_runs_leftovers_and_have_the_usual_mode(tmp_path: Path) -> None:
    final = tmp_path / "data" / "raw" / "emoji"
    stale = final.parent / ".emoji.npm"
    stale.mkdir(parents=True)
    (stale / "emoji-datasource-apple-16.0.0.tgz").write_bytes(b"x" * 1000)  # what a kill during npm pack leaves
    umask = os.umask(0)
    os.umask(umask)
    with staging_directory(final, "npm") as folder:
        assert folder == stale and list(folder.iterdir()) == []
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not stale.exists()
