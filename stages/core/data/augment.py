"""Batched training augmentation on the device: random-resized crop, flip, colour jitter, normalisation.

The crop boxes are drawn on the CPU, one NumPy generator per item seeded by the sampler's per-item
seed, with torchvision's ``RandomResizedCrop.get_params`` algorithm in the ORIGINAL image's pixels
(area scale in [min_crop_scale, 1], aspect ratio in [3/4, 4/3], ten tries, then the centre-crop
fallback). A box becomes a 2 x 3 affine matrix over normalised coordinates, so one ``grid_sample``
crops and resizes the whole batch. The cached images are stored squeezed to a square (see
:mod:`stages.core.data.image_cache`); a box in normalised coordinates is the same region of the squeezed
image, so the crops keep the original aspect ratio. Draws depend only on the seed, never on the
process count or the batch a sample lands in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.config import AugmentParams
from stages.core.data.transforms import eval_resize

RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def crop_box(rng: np.random.Generator, width: int, height: int, min_scale: float) -> tuple[float, float, float, float]:
    """(left, top, w, h) in pixels, as torchvision's ``RandomResizedCrop.get_params`` draws it."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1)), float(w), float(h)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def centre_box(width: int, height: int, image_size: int) -> tuple[float, float, float, float]:
    """The evaluation geometry (resize the short side to image_size * 256 / 224, centre crop image_size)
    as a box in the original pixels."""
    side = min(width, height) * image_size / eval_resize(image_size)
    return (width - side) / 2, (height - side) / 2, side, side


def box_theta(box: tuple[float, float, float, float], width: int, height: int, flip: bool) -> np.ndarray:
    """The ``affine_grid`` matrix (align_corners=False) that samples ``box`` of a width x height image."""
    left, top, w, h = box
    sx, sy = w / width, h / height
    cx, cy = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    return np.array([[-sx if flip else sx, 0.0, cx], [0.0, sy, cy]], dtype=np.float32)


def draw_augmentation(
    seeds: Sequence[int], sizes: np.ndarray, augment: AugmentParams, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per item (seed, original width x height): the B x 2 x 3 crop matrices and the B x 3 colour factors
    (brightness, contrast, saturation; all 1 without jitter)."""
    theta = np.empty((len(seeds), 2, 3), dtype=np.float32)
    colour = np.ones((len(seeds), 3), dtype=np.float32)
    s = augment.color_jitter
    for i, (seed, (width, height)) in enumerate(zip(seeds, sizes.tolist(), strict=True)):
        rng = np.random.default_rng(seed)
        box = (
            centre_box(width, height, image_size)
            if augment.min_crop_scale >= 1
            else crop_box(rng, width, height, augment.min_crop_scale)
        )
        if s > 0:
            colour[i] = rng.uniform(1 - s, 1 + s, size=3)
        theta[i] = box_theta(box, width, height, flip=augment.flip and bool(rng.integers(0, 2)))
    return theta, colour


def adjust_colour(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, then saturation of B x 3 x H x W images in [0, 1], per-image factors
    (B x 3), each as torchvision's ``adjust_*`` (ColorJitter applies them in a random order)."""
    grey_weights = x.new_tensor(GREY).view(1, 3, 1, 1)
    b, c, s = (factors[:, i].view(-1, 1, 1, 1).to(x.dtype) for i in range(3))
    x = (x * b).clamp(0, 1)
    mean = (x * grey_weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp(0, 1)
    grey = (x * grey_weights).sum(1, keepdim=True)
    return (s * x + (1 - s) * grey).clamp(0, 1)


def augment_batch(
    images: torch.Tensor,
    theta: torch.Tensor,
    colour: torch.Tensor | None,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 B x S x S x 3 images (on the device) -> normalised float B x 3 x out x out crops.

    One bilinear ``grid_sample`` crops, resizes and flips every image; ``colour`` (B x 3 factors, or None)
    jitters. Bilinear without antialiasing: crops of a cache stored at ~256/224 of the output size shrink
    by at most that factor, where aliasing is negligible.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [len(x), 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if colour is not None:
        x = adjust_colour(x, colour.to(x.device))
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    return (x - m) / s
