"""Backbones by name (``model.backbone``, ``imagetext.features.backbone``): a module that maps images to a
feature map, with its channel count and input normalisation. The family is a :class:`Registry`, so a new
architecture is one decorated factory; ``family:<arg>`` specs reach timm (``timm:resnet50.tv_in1k``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.hub import load_cached_or_online
from stages.core.registry import Registry, parse_spec

OFFLINE_HINT = "without hub access use backbone: efficientnet-lite0 (offline weights) or model.pretrained: false"


@dataclass
class Backbone:
    """``module`` maps B x 3 x H x W to a B x C x h x w feature map; mean/std are for 0..1 tensors."""

    module: nn.Module
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BackboneFactory = Callable[[str, bool], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def create_backbone(spec: str, pretrained: bool) -> Backbone:
    """``spec`` is a registered name, or ``family:<arg>`` (e.g. ``timm:resnet50``)."""
    family, arg = parse_spec(spec, kind="backbone")
    return BACKBONES.get(family)(arg, pretrained)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite0 without its classifier: forward is ``extract_features``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()  # the ImageNet classifier is never used; do not train or save it
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


@BACKBONES.register("efficientnet-lite0")
def _efficientnet_lite0(arg: str, pretrained: bool) -> Backbone:
    from stages.core.model.efficientnet_lite import LITE0_FEATURES, LITE0_MEAN, LITE0_STD, load_efficientnet_lite0

    if arg:
        raise LangdmlError(f"backbone 'efficientnet-lite0' takes no ':{arg}' suffix")
    return Backbone(_LiteFeatures(load_efficientnet_lite0(pretrained)), LITE0_FEATURES, LITE0_MEAN, LITE0_STD)


class _TimmFeatures(nn.Module):
    """A timm model without pooling/classifier; token outputs (ViTs) become a B x C x N x 1 map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y.transpose(1, 2).unsqueeze(-1) if y.ndim == 3 else y


@BACKBONES.register("timm")
def _timm(name: str, pretrained: bool) -> Backbone:
    import timm

    if not name:
        raise LangdmlError("backbone 'timm' needs a model name, e.g. timm:resnet50")
    if not timm.is_model(name):
        raise LangdmlError(f"timm has no model {name!r} (see timm.list_models()); or use efficientnet-lite0")

    def create() -> nn.Module:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")

    # Pretrained weights: the local cache first, the hub only if it answers (one line when offline).
    net = load_cached_or_online(f"backbone timm:{name}", create, OFFLINE_HINT) if pretrained else create()
    cfg = timm.data.resolve_data_config({}, model=net)
    return Backbone(_TimmFeatures(net), int(net.num_features), tuple(cfg["mean"]), tuple(cfg["std"]))
