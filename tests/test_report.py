"""The evaluation pictures are real PNGs of the documented pixel size, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.evaluation.report import (
    CORRECT_COLOUR,
    WRONG_COLOUR,
    GalleryRow,
    _wrapped,
    gallery_size,
    language_order,
    pick_gallery_queries,
    plot_gallery,
    plot_similarity,
    similarity_size,
)


def _img(value: int) -> np.ndarray:
    return np.full((16, 16, 3), value, dtype=np.uint8)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _has_colour(png: np.ndarray, colour: str, tol: int = 12) -> bool:
    return bool((np.abs(png[..., :3].astype(int) - _hex_rgb(colour)).max(axis=-1) <= tol).any())


def test_gallery_png_size_and_frames(tmp_path: Path) -> None:
    rows = [
        GalleryRow(
            _img(200),
            "t-shirt",
            [_img(10)] * 5,
            ["t-shirt", "shirt", "t-shirt", "a" * 40, "bag"],
            [1, 0, 1, 0, 0],
        ),
        GalleryRow(_img(90), "bag", [_img(60)] * 5, ["bag"] * 5, [True] * 5),
        GalleryRow(_img(30), "sandal", [_img(60)] * 3, ["sneaker"] * 3, [False] * 3),  # fewer neighbours
    ]
    out = plot_gallery(rows, tmp_path / "eval" / "gallery.png")
    assert out == tmp_path / "eval" / "gallery.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == gallery_size(3, 5)
        png = np.asarray(im.convert("RGB"))
    assert _has_colour(png, CORRECT_COLOUR)
    assert _has_colour(png, WRONG_COLOUR)
    assert [p.name for p in out.parent.iterdir()] == ["gallery.png"]  # no temporary file left


def test_gallery_all_correct_has_no_red(tmp_path: Path) -> None:
    rows = [GalleryRow(_img(200), "bag", [_img(10)] * 2, ["bag"] * 2, [True, True])]
    with Image.open(plot_gallery(rows, tmp_path / "g.png")) as im:
        assert im.size == gallery_size(1, 2)
        png = np.asarray(im.convert("RGB"))
    assert _has_colour(png, CORRECT_COLOUR)
    assert not _has_colour(png, WRONG_COLOUR, tol=40)


def test_gallery_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_gallery([], tmp_path / "g.png")


@pytest.mark.parametrize("n_classes", [4, 60])
def test_similarity_png(tmp_path: Path, n_classes: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (n_classes, n_classes))
    b = rng.uniform(-1, 1, (n_classes, n_classes))
    names = [f"class {i}" for i in range(n_classes)]
    out = plot_similarity(a, b, names, tmp_path / "similarity.png")
    assert out.stat().st_size > 1000
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == similarity_size(n_classes)
        png = np.asarray(im.convert("RGB"))
    assert png.std() > 10  # not a blank canvas


def test_language_order_puts_each_block_of_related_classes_together() -> None:
    rng = np.random.default_rng(0)
    block = rng.permutation(np.repeat(np.arange(5), 12))  # 60 classes in 5 hidden groups, shuffled
    sim = np.where(block[:, None] == block[None, :], 0.8, 0.1) + rng.normal(0, 0.02, (60, 60))
    order = language_order(sim)
    assert sorted(order.tolist()) == list(range(60))
    runs = 1 + int(np.count_nonzero(np.diff(block[order])))
    assert runs == 5  # each group is one contiguous run of the order


def test_gallery_names_are_wrapped_whole() -> None:
    name = "family: man, woman, girl, boy"
    text = _wrapped(name)
    assert text.replace("\n", " ") == name and max(len(line) for line in text.splitlines()) <= 20
    assert _wrapped("x" * 100, lines=2).endswith("…")


def test_similarity_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 x 3"):
        plot_similarity(np.eye(3), np.eye(2), ["a", "b", "c"], tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_gallery_queries_spread_over_classes_and_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3])  # class 3 is a singleton
    picked = pick_gallery_queries(labels, 6, seed=0)
    assert len(picked) == len(set(picked.tolist())) == 6
    assert sorted(labels[picked[:3]].tolist()) == [0, 1, 2]  # one per class first; the singleton last
    assert 3 not in labels[picked[:3]]
    np.testing.assert_array_equal(picked, pick_gallery_queries(labels, 6, seed=0))
    assert not np.array_equal(picked, pick_gallery_queries(labels, 6, seed=1))
    assert len(pick_gallery_queries(labels, 100, seed=0)) == len(labels)  # capped by the data
