"""Image encoder: a registered backbone, global pooling, a linear head, L2 normalisation.

The backbone family is a :class:`Registry` so a new architecture is one decorated factory.
``load_model`` rebuilds the architecture without pretrained weights and loads our own
safetensors, so evaluation never needs a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.config import AugmentParams, ModelParams, eval_resize
from stages.core.errors import LangdmlError, first_line
from stages.core.heads import HEADS, global_pool
from stages.core.hub import load_cached_or_online
from stages.core.io import atomic_path, write_json
from stages.core.registry import Registry, parse_spec

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_FORMAT = 1
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
    from stages.core.efficientnet_lite import LITE0_FEATURES, LITE0_MEAN, LITE0_STD, load_efficientnet_lite0

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


class EmbeddingModel(nn.Module):
    """Backbone -> a registered head -> L2-normalised embeddings (B x D, or B x K x D for a set head);
    ``pooled`` is the head-less control."""

    def __init__(
        self, backbone: Backbone, head: nn.Module, pooling: str, embed_dim: int, freeze_bn: bool = False
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "avg+max"):
            raise LangdmlError(f"model.pooling must be avg or avg+max, got {pooling!r}")
        self.backbone = backbone.module
        self.head = head
        self.similarity: str = head.similarity
        self.similarity_options: dict[str, Any] = dict(head.similarity_options)
        self.slots: int | None = head.slots
        self.pooling = pooling
        self.freeze_bn = freeze_bn
        self.channels = backbone.channels
        self.embed_dim = embed_dim
        self.mean = tuple(backbone.mean)
        self.std = tuple(backbone.std)

    def train(self, mode: bool = True) -> EmbeddingModel:
        """With ``freeze_bn`` BatchNorm keeps its ImageNet running statistics (paper's ResNet50 setting)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.backbone(x), self.pooling)

    def encode(self, x: torch.Tensor) -> dict[str, Any]:
        """The head's dict: ``embeddings`` and what the head exposes (slot residuals, attention maps)."""
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)["embeddings"]

    def spatial_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The head's maps over the feature grid (B x M x h x w) and their titles: a set head's slot
        attention, the linear head's feature norm."""
        return self.head.maps(self.backbone(x))


def build_model(model_params: ModelParams) -> EmbeddingModel:
    backbone = create_backbone(model_params.backbone, model_params.pretrained)
    head = HEADS.get(model_params.head)(backbone.channels, model_params)
    return EmbeddingModel(backbone, head, model_params.pooling, model_params.embed_dim, model_params.freeze_bn)


def save_model(model: EmbeddingModel, model_params: ModelParams, directory: str | Path) -> None:
    """Weights (safetensors) and ``config.json`` (the ModelParams), each written atomically."""
    from safetensors.torch import save_model as st_save

    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        st_save(model, str(tmp))
    write_json(
        directory / CONFIG_NAME,
        {
            "format": CONFIG_FORMAT,
            "model": model_params.model_dump(),
            "embed_dim": model.embed_dim,
            "channels": model.channels,
            "mean": list(model.mean),
            "std": list(model.std),
        },
    )


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[EmbeddingModel, ModelParams]:
    """Rebuild the architecture (no pretrained download) and load the saved weights; eval mode."""
    from safetensors.torch import load_model as st_load

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights):
        if not p.is_file():
            raise LangdmlError(f"{p} does not exist (run `langdml train` first)")
    try:
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise LangdmlError(f"{cfg_path} is unreadable ({err}); re-run `langdml train`") from None
    if cfg.get("format") != CONFIG_FORMAT:
        raise LangdmlError(f"{cfg_path}: unsupported model format {cfg.get('format')!r}; re-run `langdml train`")
    model_params = ModelParams(**cfg["model"])
    model = build_model(model_params.model_copy(update={"pretrained": False}))
    try:
        st_load(model, str(weights), strict=True)
    except RuntimeError as err:
        raise LangdmlError(f"{weights} does not match {cfg_path}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # safetensors' own errors (truncated file, bad header) have no common base
        raise LangdmlError(f"{weights} is unreadable ({first_line(err)}); re-run `langdml train`") from None
    return model.to(device).eval(), model_params


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentParams
) -> Callable[[Any], torch.Tensor]:
    """A random-resized crop of at least ``min_crop_scale`` of the area (1: the evaluation geometry),
    optional colour jitter and flips, then the backbone's normalisation."""
    from torchvision import transforms as T

    steps: list[Callable[[Any], Any]] = (
        list(eval_geometry(image_size).transforms)
        if augment.min_crop_scale >= 1
        else [T.RandomResizedCrop(image_size, scale=(augment.min_crop_scale, 1.0))]
    )
    if augment.color_jitter > 0:
        s = augment.color_jitter
        steps.append(T.ColorJitter(brightness=s, contrast=s, saturation=s))
    if augment.flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def eval_geometry(image_size: int) -> Callable[[Any], Any]:
    """The evaluation resize and centre crop (PIL in, PIL out): what the model sees of an image."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size)])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([*eval_geometry(image_size).transforms, T.ToTensor(), T.Normalize(mean, std)])
