"""Backbones, pooling, the embedding head, freeze_bn, transforms and the safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.core.config import AugmentParams, ModelParams
from stages.core.data.transforms import eval_transform, train_transform
from stages.core.errors import LangdmlError
from stages.core.model import encoder as vision
from stages.core.model.backbones import BACKBONES, create_backbone
from stages.core.model.efficientnet_lite import LITE0_FEATURES, LITE0_MEAN
from stages.core.model.encoder import EmbeddingModel, build_model, load_model, save_model
from stages.core.model.heads import LinearHead, global_pool
from stages.core.registry import RegistryError

torch.set_num_threads(1)
TINY = ModelParams(backbone="timm:test_resnet", pretrained=False, embed_dim=16, image_size=32)


def test_registry_lists_both_families() -> None:
    assert {"efficientnet-lite0", "timm"} <= set(BACKBONES.names())
    with pytest.raises(RegistryError, match="efficientnet-lite0"):
        create_backbone("resnet-from-nowhere", pretrained=False)


def test_efficientnet_lite0_loads_offline_weights_and_gives_a_feature_map() -> None:
    bb = create_backbone("efficientnet-lite0", pretrained=True)
    assert bb.channels == LITE0_FEATURES and bb.mean == LITE0_MEAN
    assert not any("_fc" in k for k in bb.module.state_dict())  # the ImageNet classifier is dropped
    with torch.no_grad():
        fmap = bb.module.eval()(torch.zeros(1, 3, 64, 64))
    assert fmap.shape == (1, LITE0_FEATURES, 2, 2)
    with pytest.raises(LangdmlError, match="no ':x' suffix"):
        create_backbone("efficientnet-lite0:x", pretrained=False)


def test_timm_backbone_map_channels_and_normalisation() -> None:
    bb = create_backbone("timm:test_resnet", pretrained=False)
    fmap = bb.module(torch.randn(2, 3, 32, 32))
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, bb.channels)
    assert len(bb.mean) == 3 and len(bb.std) == 3


def test_timm_unknown_model_and_offline_pretrained_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    with pytest.raises(LangdmlError, match="no model 'resnet9000'"):
        create_backbone("timm:resnet9000", pretrained=False)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nretrying ...")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(LangdmlError) as err:
        create_backbone("timm:resnet18", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "timm:resnet18" in msg and "efficientnet-lite0" in msg


def test_global_pool_avg_and_avg_plus_max() -> None:
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    avg = fmap.reshape(2, 3, 4).mean(-1)
    mx = fmap.reshape(2, 3, 4).max(-1).values
    torch.testing.assert_close(global_pool(fmap, "avg"), avg)
    torch.testing.assert_close(global_pool(fmap, "avg+max"), avg + mx)


@pytest.mark.parametrize("pooling", ["avg", "avg+max"])
def test_embedding_model_outputs_unit_vectors_and_pooled_features(pooling: str) -> None:
    model = build_model(TINY.model_copy(update={"pooling": pooling})).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb = model(x)
        pooled = model.pooled(x)
        fmap = model.backbone(x)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(pooled, global_pool(fmap, pooling))
    linear = torch.nn.functional.linear(pooled, model.head.weight, model.head.bias)
    torch.testing.assert_close(emb, torch.nn.functional.normalize(linear, dim=1))


def test_freeze_bn_keeps_running_statistics() -> None:
    torch.manual_seed(0)
    model = build_model(TINY.model_copy(update={"freeze_bn": True})).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.head.training
    before = [m.running_mean.clone() for m in bns]
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    # Without freeze_bn the statistics move.
    free = build_model(TINY.model_copy(update={"freeze_bn": False})).train()
    free_bn = next(m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    start = free_bn.running_mean.clone()
    free(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not torch.equal(start, free_bn.running_mean)


def test_bad_pooling_is_an_error() -> None:
    bb = create_backbone("timm:test_resnet", pretrained=False)
    with pytest.raises(LangdmlError, match="pooling"):
        EmbeddingModel(bb, LinearHead(bb.channels, 8, "avg"), "median", 8)


def test_transforms_shapes_and_normalisation() -> None:
    img = Image.fromarray(np.full((28, 20, 3), 255, dtype=np.uint8))
    ev = eval_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(img)
    assert ev.shape == (3, 32, 32)
    torch.testing.assert_close(ev, torch.full((3, 32, 32), 2.0))  # (1 - 0.5) / 0.25
    torch.manual_seed(0)
    tr = train_transform(24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), AugmentParams())(img)
    assert tr.shape == (3, 24, 24) and tr.min() >= 0 and tr.max() <= 1
    steps = [type(t).__name__ for t in train_transform(24, (0,) * 3, (1,) * 3, AugmentParams()).transforms]
    assert steps == ["RandomResizedCrop", "ToTensor", "Normalize"]  # the default: no flip, no jitter
    paper = AugmentParams(flip=True, min_crop_scale=0.08, color_jitter=0.2)
    steps = train_transform(24, (0,) * 3, (1,) * 3, paper).transforms
    assert [type(t).__name__ for t in steps] == [
        "RandomResizedCrop",
        "ColorJitter",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    assert steps[0].scale == (0.08, 1.0)
    fixed = train_transform(24, (0,) * 3, (1,) * 3, AugmentParams(min_crop_scale=1.0)).transforms
    assert [type(t).__name__ for t in fixed][:2] == ["Resize", "CenterCrop"]  # 1: the evaluation geometry
    names = [type(t).__name__ for t in eval_transform(224, (0, 0, 0), (1, 1, 1)).transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert eval_transform(224, (0, 0, 0), (1, 1, 1)).transforms[0].size == 256


def test_save_and_load_round_trip_needs_no_pretrained_download(tmp_path, monkeypatch) -> None:
    params = TINY.model_copy(update={"pretrained": True, "pooling": "avg+max"})
    torch.manual_seed(0)
    model = vision.build_model(params.model_copy(update={"pretrained": False})).eval()
    save_model(model, params, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["backbone"] == "timm:test_resnet" and cfg["embed_dim"] == 16

    real = vision.create_backbone

    def no_hub(spec: str, pretrained: bool):
        assert not pretrained, "load_model must not ask for pretrained weights"
        return real(spec, pretrained)

    monkeypatch.setattr(vision, "create_backbone", no_hub)
    loaded, loaded_params = load_model(tmp_path)
    assert loaded_params == params and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_model_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(LangdmlError, match="langdml train"):
        load_model(tmp_path)
    model = build_model(TINY)
    save_model(model, TINY, tmp_path)
    other = TINY.model_copy(update={"embed_dim": 8})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"] = other.model_dump()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LangdmlError, match="does not match") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_timm_backbone_uses_the_cache_first_loader(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Offline with an empty cache, a pretrained timm backbone fails at once in one line naming the
    model, as classifiers do, instead of waiting on the hub's retries."""
    import time

    from huggingface_hub import constants

    from stages.core import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(LangdmlError) as err:
        create_backbone("timm:resnet18.a1_in1k", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "backbone timm:resnet18.a1_in1k" in msg and "unreachable" in msg
    assert "efficientnet-lite0" in msg
    assert time.perf_counter() - start < 20
