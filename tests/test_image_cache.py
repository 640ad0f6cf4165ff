"""The decoded-image cache and the batched on-device augmentation that reads it."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from fixtures_training import CLASS_IDS, CLASS_NAMES, tiny_params, train_paths, write_class_embeddings
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from stages.core.artifacts import MANIFEST_SCHEMA
from stages.core.config import AugmentParams
from stages.core.data.augment import adjust_colour, augment_batch, box_theta, centre_box, crop_box, draw_augmentation
from stages.core.data.image_cache import IMAGES, INDEX, SUMMARY, ImageCache, SquashResize, write_image_cache
from stages.core.data.torch_dataset import ImageDataset
from stages.core.data.train_images import CachedImages, Pipeline
from stages.core.dml.objective import train_dml
from stages.core.errors import LangdmlError

torch.set_num_threads(1)


def manifest(sizes: list[tuple[int, int]], seed: int = 0) -> pa.Table:
    """Random RGB images of the given (width, height), embedded as PNG bytes, labels cycling over CLASS_IDS."""
    rng = np.random.default_rng(seed)
    blobs, labels = [], []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        blobs.append(buf.getvalue())
        labels.append(CLASS_IDS[i % len(CLASS_IDS)])
    return pa.table(
        {
            "path": pa.nulls(len(labels), pa.string()),
            "image_bytes": blobs,
            "label": pa.array(labels, pa.int64()),
            "class_name": [CLASS_NAMES[c] for c in labels],
            "super_class": pa.nulls(len(labels), pa.string()),
        },
        schema=MANIFEST_SCHEMA,
    )


# --- crop boxes, matrices and colour --------------------------------------------------------------


def test_crop_boxes_follow_random_resized_crop() -> None:
    """Area fraction in [scale, 1], aspect ratio in [3/4, 4/3], inside the image, as torchvision draws them."""
    for seed in range(500):
        left, top, w, h = crop_box(np.random.default_rng(seed), 120, 80, 0.3)
        assert left >= 0 and top >= 0 and left + w <= 120 and top + h <= 80
        assert 0.3 - 0.03 <= w * h / (120 * 80) <= 1.0 + 1e-9
        assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03  # rounding to whole pixels


def test_crop_box_fallback_is_torchvision_s_centre_crop() -> None:
    """No draw fits a 1000 x 10 strip, so both fall back to the same centred 4:3 crop."""
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), scale=(0.99, 1.0), ratio=(3 / 4, 4 / 3))
    assert crop_box(np.random.default_rng(0), 1000, 10, 0.99) == (j, i, w, h)


def test_a_pixel_aligned_box_is_exactly_those_pixels_and_flip_mirrors_them() -> None:
    img = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    theta = torch.from_numpy(box_theta((2, 1, 4, 4), 8, 8, flip=False))[None]
    out = augment_batch(img, theta, None, 4, (0, 0, 0), (1, 1, 1))
    expected = img[0, 1:5, 2:6].permute(2, 0, 1).float() / 255
    torch.testing.assert_close(out[0], expected)
    flipped = augment_batch(
        img, torch.from_numpy(box_theta((2, 1, 4, 4), 8, 8, flip=True))[None], None, 4, (0,) * 3, (1,) * 3
    )
    torch.testing.assert_close(flipped[0], expected.flip(-1))


def test_normalisation_uses_the_backbone_mean_and_std() -> None:
    img = torch.full((1, 4, 4, 3), 51, dtype=torch.uint8)  # 0.2
    theta = torch.from_numpy(box_theta((0, 0, 4, 4), 4, 4, flip=False))[None]
    out = augment_batch(img, theta, None, 4, (0.1, 0.2, 0.3), (0.5, 0.25, 0.1))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.2, 0.0, -1.0]))


def test_the_evaluation_geometry_crops_the_centre() -> None:
    """min_crop_scale 1: resize the short side to 64 (for a 56 crop), centre crop: here pixels 4..59 of 64."""
    assert centre_box(64, 64, 56) == (4.0, 4.0, 56.0, 56.0)
    img = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    theta, _ = draw_augmentation([7], np.array([[64, 64]]), AugmentParams(min_crop_scale=1.0), 56)
    out = augment_batch(img, torch.from_numpy(theta), None, 56, (0,) * 3, (1,) * 3)
    torch.testing.assert_close(out[0], img[0, 4:60, 4:60].permute(2, 0, 1).float() / 255)
    left, top, w, h = centre_box(200, 100, 56)  # wide: the short side decides
    assert (w, h) == (100 * 56 / 64,) * 2 and (left, top) == ((200 - w) / 2, (100 - h) / 2)


def test_colour_jitter_equals_torchvision_s_adjustments() -> None:
    x = torch.rand(3, 3, 9, 7)
    factors = torch.tensor([[1.3, 0.7, 1.2], [0.6, 1.4, 0.5], [1.0, 1.0, 1.0]])
    ours = adjust_colour(x, factors)
    for i in range(3):
        b, c, s = factors[i].tolist()
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s)
        torch.testing.assert_close(ours[i], ref)


def test_draws_depend_on_the_item_seed_alone() -> None:
    aug = AugmentParams(flip=True, min_crop_scale=0.2, color_jitter=0.4)
    sizes = np.array([[50, 40], [30, 60], [64, 64]])
    theta, colour = draw_augmentation([11, 22, 33], sizes, aug, 32)
    alone_t, alone_c = draw_augmentation([22], sizes[1:2], aug, 32)
    np.testing.assert_array_equal(theta[1], alone_t[0])
    np.testing.assert_array_equal(colour[1], alone_c[0])
    assert not np.allclose(theta[0], theta[2])
    assert np.all((colour >= 0.6) & (colour <= 1.4))
    flips = [draw_augmentation([s], sizes[:1], aug, 32)[0][0, 0, 0] < 0 for s in range(200)]
    assert 60 < sum(flips) < 140


def test_crops_keep_the_original_aspect_of_a_squeezed_image() -> None:
    """A 2:1 image squeezed to a square: a box of 40 x 40 original pixels covers 40/100 of the width, 40/50 of the
    height, so the crop undoes the squeeze."""
    theta = box_theta((10, 5, 40, 40), 100, 50, flip=False)
    assert theta[0, 0] == pytest.approx(0.4) and theta[1, 1] == pytest.approx(0.8)
    assert theta[0, 2] == pytest.approx(2 * 30 / 100 - 1) and theta[1, 2] == pytest.approx(2 * 25 / 50 - 1)


# --- the cache files ---------------------------------------------------------------------------


def test_cache_round_trip_keeps_rows_labels_sizes(tmp_path: Path) -> None:
    sizes = [(20, 10), (12, 12), (9, 30), (16, 16), (25, 14)]
    table = manifest(sizes)
    folder = tmp_path / "cache"
    summary = write_image_cache(ImageDataset(table, tmp_path, SquashResize(8)), folder, 8, {"manifest_sha256": "x"})
    assert summary == {"enabled": True, "images": 5, "side": 8, "megabytes": summary["megabytes"]}
    assert json.loads((folder / SUMMARY).read_text()) == summary
    cache = ImageCache(folder)
    assert cache.labels.tolist() == table["label"].to_pylist()
    assert cache.sizes.tolist() == [list(s) for s in sizes]
    rows = cache.gather(np.array([3, 0, 3, 4]))
    assert rows.shape == (4, 8, 8, 3) and rows.dtype == torch.uint8
    expected = SquashResize(8)(ImageDataset(table, tmp_path, None).load(3))[0]
    np.testing.assert_array_equal(rows[0].numpy(), expected)
    np.testing.assert_array_equal(rows[0].numpy(), rows[2].numpy())
    assert cache.meta["params"] == {"manifest_sha256": "x", "side": 8}


def test_a_failed_write_keeps_the_previous_cache(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_image_cache(ImageDataset(manifest([(8, 8)] * 4), tmp_path, SquashResize(8)), folder, 8, {})
    before = (folder / IMAGES).read_bytes()
    broken = manifest([(8, 8)] * 4).set_column(1, "image_bytes", pa.array([b"x"] * 4, pa.binary()))
    with pytest.raises(LangdmlError, match="cannot read image row 0"):
        write_image_cache(ImageDataset(broken, tmp_path, SquashResize(8)), folder, 8, {})
    assert (folder / IMAGES).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no partial folder left


def test_a_truncated_array_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_image_cache(ImageDataset(manifest([(8, 8)] * 4), tmp_path, SquashResize(8)), folder, 8, {})
    data = (folder / IMAGES).read_bytes()
    (folder / IMAGES).write_bytes(data[: len(data) // 2])
    with pytest.raises(LangdmlError, match="re-run `langdml cache-images`"):
        ImageCache(folder)


# --- training from the cache -------------------------------------------------------------------


def test_fit_from_the_cache_is_reproducible(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    table = manifest([(16 + i % 5, 12 + i % 3) for i in range(24)])
    write_image_cache(ImageDataset(table, tmp_path, SquashResize(18)), folder, 18, {})
    params = tiny_params(train={"epochs": 2, "augment": {"flip": True, "min_crop_scale": 0.3, "color_jitter": 0.3}})
    weights = []
    for run in ("a", "b"):
        paths = train_paths(tmp_path / run)
        write_class_embeddings(paths.class_embeddings)
        result = train_dml(params, CachedImages(ImageCache(folder)), paths, class_names=CLASS_NAMES)
        assert result.epochs_trained == 2
        assert all(math.isfinite(v) for row in result.history for k, v in row.items() if k.startswith("loss/"))
        weights.append((paths.model_dir / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_cached_batches_have_the_model_input_shape(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write_image_cache(ImageDataset(manifest([(20, 10)] * 8), tmp_path, SquashResize(12)), folder, 12, {})
    pipe = Pipeline(10, (0.5,) * 3, (0.25,) * 3, AugmentParams(color_jitter=0.2))
    data = CachedImages(ImageCache(folder)).build(pipe)
    x, y = data.collate(data.dataset.__getitems__([(0, 1), (5, 2), (5, 3)]))
    assert y.tolist() == [0, 1, 1]  # dense labels
    out = data.to_device(x, torch.device("cpu"))
    assert out.shape == (3, 3, 10, 10) and out.dtype == torch.float32
    assert out.min() >= -2 - 1e-6 and out.max() <= 2 + 1e-6  # (x - 0.5) / 0.25 with x in [0, 1]


def test_cache_stage_then_train_stage_and_a_stale_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cache-images writes the cache (or only cache.json when off); train reads it and refuses a stale one."""
    from typer.testing import CliRunner

    from stages import paths
    from stages.cli import app
    from stages.core.tables import write_parquet

    monkeypatch.chdir(tmp_path)
    write_parquet(paths.TRAIN_MANIFEST, manifest([(14, 10)] * 24), MANIFEST_SCHEMA, {"dataset": "t", "root": "."})
    write_class_embeddings(paths.CLASS_EMBEDDINGS)
    raw = tiny_params(train={"epochs": 1}).model_dump()
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    assert runner.invoke(app, ["cache-images"]).exit_code == 0
    assert sorted(p.name for p in paths.IMAGE_CACHE.iterdir()) == [SUMMARY]
    raw["train"]["image_cache"] = {"enabled": True, "side": 20}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    missing = runner.invoke(app, ["train"])
    assert missing.exit_code == 1 and "run `langdml cache-images`" in missing.stderr
    assert runner.invoke(app, ["cache-images"]).exit_code == 0
    assert sorted(p.name for p in paths.IMAGE_CACHE.iterdir()) == [SUMMARY, IMAGES, INDEX]
    ok = runner.invoke(app, ["train"])
    assert ok.exit_code == 0, ok.output
    raw["train"]["image_cache"]["side"] = 24
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    stale = runner.invoke(app, ["train"])
    assert stale.exit_code == 1
    line = stale.stderr.strip()
    assert "\n" not in line and "side = 20 but params.yaml has 24" in line and "re-run `langdml cache-images`" in line
