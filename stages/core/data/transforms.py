"""Image transforms of training (random-resized crop, jitter, flip) and evaluation (resize + centre crop),
with the backbone's normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from stages.core.config import AugmentParams


def eval_resize(image_size: int) -> int:
    """The short side an ``image_size`` crop is taken from at evaluation (256 for 224, as the paper)."""
    return round(image_size * 256 / 224)


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
