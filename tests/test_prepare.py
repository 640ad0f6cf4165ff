"""The ``prepare`` stage: outputs and metadata, every bad input as one line with no manifest, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures_datasets import (
    SOP_TEST,
    SOP_TRAIN,
    make_class_folders,
    make_cub,
    make_fashion,
    make_sop,
    params_for,
    tiny_jpeg,
    write_ebay,
)
from typer.testing import CliRunner

from stages import paths, prepare
from stages.cli import app
from stages.core.artifacts import load_manifest
from stages.core.data.datasets import fashion_mnist as fm
from stages.core.data.torch_dataset import ImageDataset
from stages.core.errors import LangdmlError
from stages.core.tables import read_parquet

OUTPUTS = (paths.TRAIN_MANIFEST, paths.TEST_MANIFEST, paths.CLASSES)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Stage paths are relative to the cwd; hide Debian's Fashion-MNIST and any download."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "URL", (tmp_path / "no-mirror").as_uri() + "/")
    return tmp_path


def test_prepare_writes_three_tables_with_metadata(workdir) -> None:
    root = make_cub(workdir / "raw" / "CUB_200_2011", per_class=3)
    prepare.run(params_for("cub200", "raw/CUB_200_2011", max_per_class=2))
    train, meta = read_parquet(paths.TRAIN_MANIFEST)
    assert meta == {
        "dataset": "cub200",
        "root": "raw/CUB_200_2011",
        "max_per_class": 2,
        "n_images": 4,
        "n_classes": 2,
    }
    assert train.num_rows == 4 and train["label"].to_pylist() == [1, 2, 1, 2]
    classes, cmeta = read_parquet(paths.CLASSES)
    assert cmeta["n_images"] == 8 and cmeta["n_classes"] == 4
    assert classes["split"].to_pylist() == ["train", "train", "test", "test"]
    table, manifest_root = load_manifest(paths.TEST_MANIFEST)
    assert manifest_root == Path("raw/CUB_200_2011") and manifest_root.resolve() == root.resolve()
    ds = ImageDataset(table, manifest_root, transform=lambda im: im.size)
    assert ds[0] == ((8, 8), 101)


def _expect_failure(params, match: str) -> str:
    with pytest.raises(LangdmlError, match=match) as err:
        prepare.run(params)
    msg = str(err.value)
    assert "\n" not in msg
    assert not any(p.exists() for p in OUTPUTS)
    assert not list(Path(".").rglob("*.tmp"))
    return msg


def test_missing_root(workdir) -> None:
    _expect_failure(params_for("cub200", "nowhere"), "cub200: dataset.root 'nowhere' is not a directory")


def test_missing_annotation_file_names_the_layout(workdir) -> None:
    root = make_cub(workdir / "cub")
    (root / "image_class_labels.txt").unlink()
    _expect_failure(
        params_for("cub200", root),
        "image_class_labels.txt not found in .*; expected the official layout with images.txt, "
        "image_class_labels.txt, classes.txt, images",
    )
    (workdir / "sop").mkdir()
    _expect_failure(params_for("sop", workdir / "sop"), "sop: Ebay_train.txt, Ebay_test.txt not found in")


def test_empty_class(workdir) -> None:
    make_class_folders(workdir / "f", {"a": 2, "b": 1})
    (workdir / "f" / "c").mkdir()
    _expect_failure(params_for("folder", workdir / "f"), "class folder 'c' has no image files")
    root = make_cub(workdir / "cub", per_class=1)
    (root / "classes.txt").write_text((root / "classes.txt").read_text() + "150 150.Sage_Thrasher\n")
    _expect_failure(params_for("cub200", root), r"1 class\(es\) have no images, e.g. 'Sage Thrasher' \(id 150\)")


def test_class_in_both_splits(workdir) -> None:
    root = make_sop(workdir / "sop")
    write_ebay(root / "Ebay_test.txt", [(3, 2, "chair_final/111500328556_9.JPG"), *SOP_TEST], start=9)
    tiny_jpeg(root / "chair_final/111500328556_9.JPG")
    _expect_failure(params_for("sop", root), r"class 3 \('chair'\) has images in both splits")


def test_duplicate_entries(workdir) -> None:
    root = make_cub(workdir / "cub", per_class=1)
    lines = (root / "images.txt").read_text().splitlines()
    first_path = lines[0].split()[1]
    (root / "images.txt").write_text("\n".join([*lines, f"99 {first_path}"]) + "\n")
    labels = (root / "image_class_labels.txt").read_text()
    (root / "image_class_labels.txt").write_text(labels + "99 1\n")
    _expect_failure(params_for("cub200", root), "cub200: duplicate entries: 1 image.* listed more than once")
    (root / "image_class_labels.txt").write_text(labels + "99 1\n1 2\n")
    _expect_failure(params_for("cub200", root), "duplicate entries: id 1 appears twice in image_class_labels.txt")


def test_listed_image_that_does_not_exist(workdir) -> None:
    root = make_sop(workdir / "sop")
    (root / SOP_TRAIN[2][2]).unlink()
    _expect_failure(
        params_for("sop", root),
        "sop: 1 image.* of the train split do not exist under .*, e.g. 'bicycle_final/111265328556_0.JPG'",
    )


def test_corrupt_idx_and_missing_fashion_mnist(workdir) -> None:
    root = make_fashion(workdir / "fm")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    _expect_failure(params_for("fashion-mnist", root), "train-images-idx3-ubyte.gz: cannot read")
    _expect_failure(params_for("fashion-mnist", workdir / "nothing"), "apt-get install dataset-fashion-mnist")


def test_failure_keeps_previous_outputs_intact(workdir) -> None:
    make_class_folders(workdir / "f", {"a": 2, "b": 2, "c": 1})
    prepare.run(params_for("folder", workdir / "f"))
    before = {p: p.read_bytes() for p in OUTPUTS}
    (workdir / "f" / "d").mkdir()
    with pytest.raises(LangdmlError, match="class folder 'd' has no image files"):
        prepare.run(params_for("folder", workdir / "f"))
    assert {p: p.read_bytes() for p in OUTPUTS} == before


def test_real_photos_folder_end_to_end(workdir) -> None:
    """Crops of scikit-learn's sample photos as JPEG class folders, through prepare and ImageDataset."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images  # 427 x 640 x 3 uint8 each
    crops = {
        "china-roof": [china[y : y + 48, x : x + 48] for y, x in ((40, 100), (40, 300), (60, 200))],
        "china-wall": [china[y : y + 48, x : x + 48] for y, x in ((300, 50), (320, 400))],
        "flower": [flower[y : y + 48, x : x + 48] for y, x in ((150, 250), (200, 300), (250, 200))],
    }
    for name, arrays in crops.items():
        (workdir / "photos" / name).mkdir(parents=True)
        for k, arr in enumerate(arrays):
            Image.fromarray(arr).save(workdir / "photos" / name / f"{k}.jpg", quality=95)
    prepare.run(params_for("folder", "photos", train_fraction=0.5, split_seed=None))
    train, root = load_manifest(paths.TRAIN_MANIFEST)
    test, _ = load_manifest(paths.TEST_MANIFEST)
    assert train["class_name"].to_pylist() == ["china-roof"] * 3 + ["china-wall"] * 2  # round(1.5) == 2
    assert test["class_name"].to_pylist() == ["flower"] * 3
    ds = ImageDataset(test, root, transform=np.asarray)
    image, label = ds[1]
    assert label == 2 and image.shape == (48, 48, 3)
    errors = [np.abs(image.astype(float) - crop).mean() for crop in crops["flower"]]
    assert np.argmin(errors) == 1 and errors[1] < 10  # the same photo crop, up to JPEG loss


def _write_params(dataset: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"dataset": dataset}))


def test_cli_prepare(workdir) -> None:
    make_fashion(workdir / "fm")
    _write_params({"name": "fashion-mnist", "root": "fm", "max_per_class": 3})
    result = CliRunner().invoke(app, ["prepare", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    train, meta = read_parquet(paths.TRAIN_MANIFEST)
    assert train.num_rows == 15 and meta["root"] == "fm"


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            {"name": "mnist"},
            "langdml prepare: error: params.yaml: dataset.name: unknown dataset 'mnist'; known: cars196, cub200",
        ),
        ({"name": "cub200", "root": "gone"}, "langdml prepare: error: cub200: dataset.root 'gone' is not"),
        ({"name": "folder", "verify": True}, "dataset.verify: unknown key; allowed here: name, root"),
    ],
)
def test_cli_prepare_errors_are_one_line(workdir, dataset, message) -> None:
    _write_params(dataset)
    result = CliRunner().invoke(app, ["prepare"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not any(p.exists() for p in OUTPUTS)


def test_portable_root_is_relative_inside_the_repo_and_absolute_outside(tmp_path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    monkeypatch.chdir(repo)
    assert paths.portable_root(repo / "data" / "raw") == "data/raw"
    assert paths.portable_root(Path("data/raw")) == "data/raw"
    assert paths.portable_root(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
