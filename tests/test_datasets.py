"""Dataset adapters on tiny fixtures in the real layouts, Fashion-MNIST's IDX/fetch logic, ImageDataset."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from fixtures_datasets import (
    SOP_TEST,
    SOP_TRAIN,
    cars_class_names,
    fashion_arrays,
    idx_bytes,
    make_cars_mat,
    make_class_folders,
    make_cub,
    make_fashion,
    make_sop,
    params_for,
    truncated_jpeg,
    write_ebay,
)
from PIL import Image

from stages.core.artifacts import CLASSES_SCHEMA, MANIFEST_SCHEMA
from stages.core.data.datasets import fashion_mnist as fm
from stages.core.data.datasets.base import first_per_class
from stages.core.data.datasets.cub200 import class_name
from stages.core.data.datasets.fashion_mnist import fetch_fashion_mnist
from stages.core.data.datasets.registry import DATASETS, build_manifests
from stages.core.data.datasets.sop import super_class_name
from stages.core.data.torch_dataset import ImageDataset
from stages.core.errors import LangdmlError
from stages.core.registry import RegistryError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def build(name: str, root: Path, **dataset: object):
    return build_manifests(params_for(name, root, **dataset).dataset)


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Hide the system's Fashion-MNIST and point downloads at a local folder (no network in tests)."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setattr(fm, "URL", mirror.as_uri() + "/")
    return mirror


def test_registry_lists_every_adapter() -> None:
    assert DATASETS.names() == ["cars196", "cub200", "emoji", "fashion-mnist", "folder", "sop"]
    with pytest.raises(RegistryError, match=r"unknown dataset 'mnist'; known: cars196, cub200"):
        DATASETS.get("mnist")


def test_first_per_class_keeps_dataset_order() -> None:
    assert first_per_class([3, 1, 3, 3, 1, 2, 1], 2) == [0, 1, 2, 4, 5]
    assert first_per_class([3, 1, 3], None) == [0, 1, 2]


def test_name_cleaning() -> None:
    assert class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    paths = pl.DataFrame({"p": ["bicycle_final/111085122871_0.JPG", "coffee_maker_final/1.JPG"]})
    assert paths.select(super_class_name(pl.col("p")))["p"].to_list() == ["bicycle", "coffee_maker"]


# --- CUB-200-2011 -----------------------------------------------------------------------------------


def test_cub200_official_split_names_and_cap(tmp_path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", per_class=3)
    out = build("cub200", root, max_per_class=2)
    assert out.train.schema.equals(MANIFEST_SCHEMA) and out.classes.schema.equals(CLASSES_SCHEMA)
    assert out.root == root.resolve()
    # images.txt interleaves classes: the first two of each class in that order
    assert out.train["label"].to_pylist() == [1, 2, 1, 2]
    assert out.test["label"].to_pylist() == [101, 102, 101, 102]
    assert out.train["path"][0].as_py() == "images/001.Black_footed_Albatross/Black_footed_Albatross_0000.jpg"
    assert out.train["path"][2].as_py().endswith("_0001.jpg")
    assert out.train["image_bytes"].null_count == 4
    assert out.classes.to_pydict() == {
        "class_id": [1, 2, 101, 102],
        "class_name": ["Black footed Albatross", "Laysan Albatross", "White Pelican", "Western Wood Pewee"],
        "split": ["train", "train", "test", "test"],
        "n_images": [2, 2, 2, 2],
        "super_class": [None] * 4,
    }


def test_cub200_train_classes_override(tmp_path) -> None:
    root = make_cub(tmp_path, per_class=1)
    out = build("cub200", root, train_classes=["White Pelican", 1])
    assert sorted(out.train["label"].to_pylist()) == [1, 101]


# --- Cars196 ------------------------------------------------------------------------------------------


def test_cars196_official_mat_layout(tmp_path) -> None:
    root = make_cars_mat(tmp_path)
    out = build("cars196", root, max_per_class=5)
    classes = out.classes.to_pydict()
    assert classes["class_id"] == list(range(1, 197))
    assert classes["split"] == ["train"] * 98 + ["test"] * 98
    assert classes["class_name"] == cars_class_names()
    assert classes["n_images"][0] == 2 and set(classes["n_images"][1:]) == {1}
    assert out.train.num_rows == 99 and out.test.num_rows == 98
    assert out.train["path"].to_pylist()[:2] == ["car_ims/000001.jpg", "car_ims/000002.jpg"]
    assert out.train["path"][-1].as_py() == "car_ims/000197.jpg"  # the second image of class 1
    assert out.test["label"][0].as_py() == 99


def test_cars196_folder_per_class_layout(tmp_path) -> None:
    names = cars_class_names()[::-1]  # created in reverse; ids follow the sorted names
    make_class_folders(tmp_path, {n: 1 for n in names})
    out = build("cars196", tmp_path)
    classes = out.classes.to_pydict()
    assert classes["class_name"] == sorted(names)
    assert classes["class_id"][:2] == [1, 2] and classes["split"][97:99] == ["train", "test"]
    assert out.train["path"][0].as_py() == f"{sorted(names)[0]}/img_000.jpg"


def test_cars196_wrong_layout(tmp_path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(LangdmlError, match=r"neither cars_annos\.mat with car_ims/ .* nor one folder per class"):
        build("cars196", tmp_path)


# --- SOP ------------------------------------------------------------------------------------------------


def test_sop_classes_and_super_classes(tmp_path) -> None:
    out = build("sop", make_sop(tmp_path), max_per_class=None)
    assert out.train["label"].to_pylist() == [1, 1, 2, 3]
    assert out.test["label"].to_pylist() == [4, 5, 5]
    assert out.train["class_name"].to_pylist() == ["bicycle", "bicycle", "bicycle", "chair"]
    assert out.test["super_class"].to_pylist() == ["bicycle", "chair", "chair"]
    assert out.classes.to_pydict() == {
        "class_id": [1, 2, 3, 4, 5],
        "class_name": ["bicycle", "bicycle", "chair", "bicycle", "chair"],
        "split": ["train", "train", "train", "test", "test"],
        "n_images": [2, 1, 1, 1, 2],
        "super_class": ["bicycle", "bicycle", "chair", "bicycle", "chair"],
    }


def test_sop_bad_header_and_class_in_both_splits(tmp_path) -> None:
    root = make_sop(tmp_path)
    (root / "Ebay_test.txt").write_text("id class path\n1 4 bicycle_final/121015839442_0.JPG\n")
    with pytest.raises(LangdmlError, match=r"Ebay_test.txt must start with the header line"):
        build("sop", root)
    make_sop(tmp_path, test=[(1, 1, SOP_TEST[0][2]), *SOP_TEST[1:]])
    with pytest.raises(LangdmlError, match=r"class 1 .* has images in both splits"):
        build("sop", root)
    write_ebay(root / "Ebay_test.txt", [])
    with pytest.raises(LangdmlError, match=r"sop: the test split has no images"):
        build("sop", root)
    make_sop(tmp_path, train=[*SOP_TRAIN, SOP_TRAIN[0]])
    with pytest.raises(LangdmlError, match=r"duplicate entries: 1 image.* e.g. 'bicycle_final/111085122871_0.JPG'"):
        build("sop", root)


# --- folder ---------------------------------------------------------------------------------------------


def test_folder_split_by_fraction_and_override(tmp_path) -> None:
    make_class_folders(tmp_path, {"dog": 2, "cat": 3, "emu": 1, "ant": 2})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    out = build("folder", tmp_path, train_fraction=0.25, split_seed=None)  # null: the first classes by name
    assert out.classes["class_name"].to_pylist() == ["ant", "cat", "dog", "emu"]
    assert out.classes["class_id"].to_pylist() == [0, 1, 2, 3]
    assert out.train["class_name"].to_pylist() == ["ant", "ant"]
    assert out.test["path"].to_pylist()[:3] == ["cat/img_000.jpg", "cat/img_001.jpg", "cat/img_002.jpg"]
    out = build("folder", tmp_path, train_fraction=0.99, split_seed=None)  # one class stays for testing
    assert out.classes["split"].to_pylist() == ["train", "train", "train", "test"]
    seeded = [build("folder", tmp_path, split_seed=s).classes["split"].to_pylist() for s in (0, 0, 1, 2, 3)]
    assert seeded[0] == seeded[1] and all(x.count("train") == 2 for x in seeded)
    assert len({tuple(x) for x in seeded}) > 1  # the seed draws which classes train
    out = build("folder", tmp_path, train_classes=["dog", "emu"])
    assert sorted(set(out.train["class_name"].to_pylist())) == ["dog", "emu"]
    with pytest.raises(LangdmlError, match=r"unknown class 'wolf'; known: ant, cat, dog, emu"):
        build("folder", tmp_path, train_classes=["wolf"])
    with pytest.raises(LangdmlError, match=r"every class is a training class"):
        build("folder", tmp_path, train_classes=[0, 1, 2, 3])


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog) -> None:
    make_class_folders(tmp_path, {"a": 3, "b": 2})
    truncated_jpeg(tmp_path / "a" / "z_truncated.jpg")
    (tmp_path / "b" / "z_text.png").write_text("not a png")
    with caplog.at_level(logging.WARNING):
        out = build("folder", tmp_path)
    assert out.n_skipped == 2 and out.train.num_rows == 3 and out.test.num_rows == 2
    assert "skipped 1 unreadable image(s) of the train split, e.g. a/z_truncated.jpg" in caplog.text
    assert out.classes["n_images"].to_pylist() == [3, 2]
    unchecked = build("folder", tmp_path, verify_images=False)
    assert unchecked.train.num_rows == 4 and unchecked.n_skipped == 0


def test_class_with_only_unreadable_images_is_an_error(tmp_path) -> None:
    make_class_folders(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(LangdmlError, match=r"class 'b' .* has no readable images left"):
        build("folder", tmp_path)


# --- Fashion-MNIST --------------------------------------------------------------------------------------


def test_parse_idx_roundtrip_and_damage() -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(arr)
    np.testing.assert_array_equal(fm.parse_idx(data, "x"), arr)
    with pytest.raises(LangdmlError, match=r"x: corrupt or truncated IDX file: dims \(2, 3, 4\) need 40 bytes"):
        fm.parse_idx(data[:-1], "x")
    with pytest.raises(LangdmlError, match=r"bad magic number"):
        fm.parse_idx(b"\x00\x00\x0d\x03" + data[4:], "x")
    with pytest.raises(LangdmlError, match=r"truncated IDX header"):
        fm.parse_idx(data[:9], "x")


def test_fashion_mnist_default_split_and_png_bytes(tmp_path, no_debian) -> None:
    root = make_fashion(tmp_path / "fm", train_per_class=4, test_per_class=3)
    out = build("fashion-mnist", root, max_per_class=2)
    assert out.root == root.resolve()
    assert out.classes["split"].to_pylist() == ["train", "test"] * 5
    assert out.classes["class_name"].to_pylist()[:3] == ["T-shirt/top", "Trouser", "Pullover"]
    assert out.train["label"].to_pylist() == [0, 2, 4, 6, 8] * 2
    assert out.test["label"].to_pylist() == [1, 3, 5, 7, 9] * 2
    assert out.train["path"].null_count == out.train.num_rows
    train_images, _ = fashion_arrays(4, seed=0)
    test_images, _ = fashion_arrays(3, seed=1)
    decoded = np.asarray(Image.open(io.BytesIO(out.train["image_bytes"][1].as_py())))
    np.testing.assert_array_equal(decoded, train_images[2])  # train classes come from the train file
    decoded = np.asarray(Image.open(io.BytesIO(out.test["image_bytes"][0].as_py())))
    np.testing.assert_array_equal(decoded, test_images[1])  # test classes from the t10k file


def test_fashion_mnist_train_classes_and_uncompressed_files(tmp_path, no_debian) -> None:
    root = make_fashion(tmp_path / "fm", gz=False)
    out = build("fashion-mnist", root, train_classes=[0, "Trouser", "Ankle boot"])
    assert sorted(set(out.train["label"].to_pylist())) == [0, 1, 9]
    assert out.train.num_rows == 12 and out.test.num_rows == 14
    with pytest.raises(LangdmlError, match=r"unknown class 'Socks'; known: Ankle boot, Bag, Coat"):
        build("fashion-mnist", root, train_classes=["Socks"])


def test_fashion_mnist_corrupt_files(tmp_path, no_debian) -> None:
    root = make_fashion(tmp_path / "fm")
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(LangdmlError, match=r"train-labels-idx1-ubyte.gz: cannot read"):
        build("fashion-mnist", root)
    make_fashion(root)
    images = root / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-5]))
    with pytest.raises(LangdmlError, match=r"t10k-images-idx3-ubyte.gz: corrupt or truncated IDX file"):
        build("fashion-mnist", root)
    make_fashion(root)
    _, short = fashion_arrays(1, seed=0)
    labels.write_bytes(gzip.compress(idx_bytes(short)))
    with pytest.raises(LangdmlError, match=r"train images \(40, 6, 6\) and labels \(10,\) do not match"):
        build("fashion-mnist", root)


def test_fashion_mnist_download_is_verified(tmp_path, no_debian, monkeypatch) -> None:
    mirror = no_debian
    make_fashion(mirror)
    sums = {n: hashlib.md5((mirror / f"{n}.gz").read_bytes()).hexdigest() for n in fm.FILES}
    monkeypatch.setattr(fm, "GZ_MD5", sums)
    root = tmp_path / "data" / "raw"
    out = build("fashion-mnist", root)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in fm.FILES)
    assert out.root == root.resolve() and out.train.num_rows == 20
    assert fetch_fashion_mnist(root) == root  # present and verified: nothing to do

    monkeypatch.setattr(fm, "GZ_MD5", {**sums, "t10k-labels-idx1-ubyte": "0" * 32})
    fresh = tmp_path / "fresh"
    with pytest.raises(LangdmlError, match=r"t10k-labels-idx1-ubyte.gz: downloaded file has the wrong MD5"):
        fetch_fashion_mnist(fresh)
    assert not any(p.name.startswith("t10k-labels") for p in fresh.iterdir())  # no half-verified file left
    with pytest.raises(LangdmlError, match=r"t10k-labels-idx1-ubyte.gz: MD5 does not match the published"):
        fetch_fashion_mnist(root)


def test_fashion_mnist_nowhere_says_how_to_get_it(tmp_path, no_debian) -> None:
    with pytest.raises(LangdmlError) as err:
        build("fashion-mnist", tmp_path / "empty")
    msg = str(err.value)
    assert "\n" not in msg and "downloading" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and fm.URL in msg


def test_fetch_copies_and_verifies_debian_files(tmp_path, monkeypatch) -> None:
    debian = make_fashion(tmp_path / "debian")
    sums = {n: hashlib.md5(gzip.decompress((debian / f"{n}.gz").read_bytes())).hexdigest() for n in fm.FILES}
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    monkeypatch.setattr(fm, "RAW_MD5", sums)  # content MD5s, as for Debian's recompressed files
    root = fetch_fashion_mnist(tmp_path / "root")
    assert all((root / f"{n}.gz").read_bytes() == (debian / f"{n}.gz").read_bytes() for n in fm.FILES)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(tmp_path) -> None:
    for name in fm.FILES:  # Debian's .gz are recompressed; their contents have the published MD5s
        fm._verify(DEBIAN / f"{name}.gz", name)
    out = build("fashion-mnist", tmp_path / "absent", max_per_class=3)
    assert out.root == DEBIAN and out.classes.num_rows == 10
    assert out.classes["n_images"].to_pylist() == [3] * 10
    image = Image.open(io.BytesIO(out.test["image_bytes"][0].as_py()))
    assert image.size == (28, 28) and image.mode == "L"


# --- ImageDataset ---------------------------------------------------------------------------------------


def test_image_dataset_from_bytes_and_paths(tmp_path, no_debian) -> None:
    out = build("fashion-mnist", make_fashion(tmp_path / "fm"), max_per_class=1)
    ds = ImageDataset(out.train, out.root, transform=lambda im: (im.mode, im.size))
    assert len(ds) == 5 and ds.labels.dtype == np.int64
    assert ds[1] == (("RGB", (6, 6)), 2)  # grayscale PNG converted to RGB

    make_class_folders(tmp_path / "f", {"a": 2, "b": 1})
    (tmp_path / "f" / "a" / "grey.png").write_bytes(_png(Image.new("L", (5, 3), 7)))
    out = build("folder", tmp_path / "f")
    ds = ImageDataset(out.train, out.root, transform=np.asarray)
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 5, 3) and (image == 7).all()
    assert ds.labels.tolist() == [0, 0, 0]


def test_image_dataset_missing_file_is_one_line(tmp_path) -> None:
    make_class_folders(tmp_path, {"a": 1, "b": 1})
    out = build("folder", tmp_path)
    (tmp_path / "a" / "img_000.jpg").unlink()
    ds = ImageDataset(out.train, tmp_path, transform=None)
    with pytest.raises(LangdmlError, match=r"cannot read image .*a/img_000\.jpg"):
        ds[0]
    with pytest.raises(LangdmlError, match=r"manifest lacks column"):
        ImageDataset(pa.table({"label": [1]}), tmp_path, transform=None)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_image_dataset_pickles_and_batches(tmp_path, no_debian) -> None:
    """Spawned DataLoader workers get a pickled copy; the default collate stacks transformed images."""
    import pickle

    import torch
    from torchvision.transforms import v2

    out = build("fashion-mnist", make_fashion(tmp_path / "fm"), max_per_class=2)
    transform = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    ds = pickle.loads(pickle.dumps(ImageDataset(out.test, out.root, transform)))
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert images.shape == (4, 3, 6, 6) and images.dtype == torch.float32 and float(images.max()) <= 1.0
    assert labels.tolist() == [1, 3, 5, 7]
    assert torch.equal(images[:, 0], images[:, 2])  # grey replicated into RGB
