"""The emoji adapter and its npm fetch, on tiny tarballs in the real packages' layouts and a fake npm."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import EMOJI_ROWS, fake_npm, make_emoji_packages, params_for
from PIL import Image

import stages.core.data.datasets.emoji as em
from stages.core import npm
from stages.core.data.datasets.registry import build_manifests, fetch_dataset
from stages.core.data.torch_dataset import ImageDataset
from stages.core.errors import LangdmlError
from stages.core.npm import integrity


@pytest.fixture
def npm_env(tmp_path, monkeypatch):
    """Fake npm on PATH serving fixture tarballs, whose digests replace the pinned ones."""
    tarballs = make_emoji_packages(tmp_path / "registry")
    fake_npm(tmp_path / "bin", tmp_path / "registry")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sources = {key: em.Package(p.name, p.version, integrity(tarballs[key])) for key, p in em.SOURCES.items()}
    monkeypatch.setattr(em, "SOURCES", sources)
    return tarballs


def test_fetch_unpacks_verified_packages_and_keeps_a_complete_folder(tmp_path, npm_env, caplog) -> None:
    root = fetch_dataset(params_for("emoji", tmp_path / "data/raw/emoji").dataset)
    assert json.loads((root / em.RECEIPT).read_text()) == em._receipt()
    assert (root / "twitter" / "1f600.png").is_file() and (root / "licenses/emojibase-data.LICENSE").is_file()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    with caplog.at_level(logging.INFO):
        em.fetch_emoji(root)
    assert "is complete" in caplog.text


def test_adapter_classes_names_vendors_and_seeded_split(tmp_path, npm_env) -> None:
    root = em.fetch_emoji(tmp_path / "emoji")
    out = build_manifests(params_for("emoji", root).dataset)
    names = out.classes["class_name"].to_pylist()
    # Component and the two-vendor dog face are left out; labels are emojibase's, in lower case.
    assert names == [r[6].lower() for r in EMOJI_ROWS if r[2] != "Component" and len(r[4]) >= 3]
    assert "red heart" in names and "flag: japan" in names  # joined on the non-qualified code / lower-cased
    counts = dict(zip(names, out.classes["n_images"].to_pylist(), strict=True))
    assert counts["top hat"] == 3 and counts["grinning face"] == 4  # skin variants are not images of a class
    assert out.classes["super_class"].to_pylist()[names.index("pizza")] == "food-prepared"
    split = out.classes["split"].to_pylist()
    again = build_manifests(params_for("emoji", root).dataset).classes["split"].to_pylist()
    other = build_manifests(params_for("emoji", root, split_seed=5).dataset).classes["split"].to_pylist()
    assert split == again and split.count("train") == round(0.5 * len(names))
    assert other != split  # the seed draws the split


def test_transparent_icons_are_composited_on_white(tmp_path, npm_env) -> None:
    root = em.fetch_emoji(tmp_path / "emoji")
    out = build_manifests(params_for("emoji", root).dataset)
    image = ImageDataset(out.train, out.root, transform=None).load(0)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and tuple(pixels[0, 0]) == (255, 255, 255)  # corner: transparent -> white
    assert Image.open(root / out.train["path"][0].as_py()).mode == "RGBA"


def test_missing_npm_is_one_line_naming_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npm.shutil, "which", lambda name: None)
    with pytest.raises(LangdmlError, match=r"npm client is not installed.*apt-get install npm") as err:
        em.fetch_emoji(tmp_path / "emoji")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "emoji").exists()


def test_unknown_package_says_what_failed(tmp_path, npm_env) -> None:
    for tarball in npm_env.values():
        tarball.unlink()
    with pytest.raises(LangdmlError, match=r"`npm pack emoji-datasource-google@16.0.0` failed \(npm ERR! 404"):
        em.fetch_emoji(tmp_path / "emoji")


def test_tampered_and_corrupt_tarballs_leave_nothing(tmp_path, npm_env, monkeypatch) -> None:
    root = tmp_path / "emoji"
    good = npm_env["twitter"].read_bytes()
    npm_env["twitter"].write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(LangdmlError, match="does not match the published SHA-512"):
        em.fetch_emoji(root)
    assert not root.exists()
    assert sorted(os.listdir(tmp_path)) == ["bin", "registry"]  # no temporaries left beside it
    # A damaged archive that still matches its (here: patched) digest fails in one line while unpacking.
    npm_env["twitter"].write_bytes(good[: len(good) // 2])
    sources = dict(em.SOURCES)
    sources["twitter"] = em.Package(sources["twitter"].name, "16.0.0", integrity(npm_env["twitter"]))
    monkeypatch.setattr(em, "SOURCES", sources)
    with pytest.raises(LangdmlError, match=r"cannot unpack emoji-datasource-twitter-16.0.0.tgz .*damaged"):
        em.fetch_emoji(root)
    assert not root.exists()


def test_failed_refetch_keeps_the_previous_folder(tmp_path, npm_env, monkeypatch) -> None:
    root = em.fetch_emoji(tmp_path / "emoji")
    (root / em.RECEIPT).write_text("{}")  # looks like other versions: fetch again ...
    monkeypatch.setattr(npm.shutil, "which", lambda name: None)  # ... which fails
    with pytest.raises(LangdmlError):
        em.fetch_emoji(root)
    assert (root / "google" / "1f600.png").is_file()


def test_missing_image_is_a_logged_skip_and_unfetched_root_an_error(tmp_path, npm_env, caplog) -> None:
    root = em.fetch_emoji(tmp_path / "emoji")
    (root / "apple" / "1f680.png").unlink()
    with caplog.at_level(logging.WARNING):
        out = build_manifests(params_for("emoji", root).dataset)
    assert "skipped 1 image(s) that emoji.json lists" in caplog.text and "apple/1f680.png" in caplog.text
    names = out.classes["class_name"].to_pylist()
    assert out.classes["n_images"].to_pylist()[names.index("rocket")] == 3
    (root / em.RECEIPT).unlink()
    with pytest.raises(LangdmlError, match="was not filled by `langdml fetch-data`"):
        build_manifests(params_for("emoji", root).dataset)


def test_user_datasets_are_checked_not_fetched(tmp_path) -> None:
    """Without --download the stage only checks: a root without the dataset's marker file is one line saying how
    to get it (tests/test_fetch_data.py downloads one)."""
    from fixtures_datasets import make_cub

    with pytest.raises(LangdmlError, match=r"cub200: dataset.root .* does not hold it \(no images.txt\); `langdml"):
        fetch_dataset(params_for("cub200", tmp_path / "nowhere").dataset)
    (tmp_path / "cub").mkdir()
    with pytest.raises(LangdmlError, match=r"does not hold it"):
        fetch_dataset(params_for("cub200", tmp_path / "cub").dataset)
    make_cub(tmp_path / "cub")
    assert fetch_dataset(params_for("cub200", tmp_path / "cub").dataset) == Path(tmp_path / "cub")
    with pytest.raises(LangdmlError, match=r"folder: dataset.root .* is not a directory"):
        fetch_dataset(params_for("folder", tmp_path / "nowhere").dataset)
