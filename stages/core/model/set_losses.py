"""DivE's loss terms (Kim, Kim, Kwak, CVPR 2023; kdwonn/DivE ``loss.py``): the VSE++ max-violation
triplet over a set-similarity matrix, the MMD between image and caption slots, and the slot-diversity
regulariser. Each is a pure function of tensors, used by the image-text objective (and, for the diversity
term, by the DML objective of a set head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def slot_diversity(residual: torch.Tensor) -> torch.Tensor:
    """DivE's slot-diversity regulariser: per sample, the mean over slot pairs k < l of
    exp(-2 ||z_k - z_l||^2) with z the L2-normalised slot residuals (B x K x D); averaged over the batch.
    1 when the slots coincide, exp(-4) when orthogonal, exp(-8) when opposite; 0 for a single slot.
    Follows ``AsymmetricTripletLoss.batchwise_uniformity_loss`` (t = 2) of kdwonn/DivE ``loss.py`` with
    ``--unif_residual``; the official term is this for the images plus this for the captions (summed)."""
    k = residual.shape[1]
    if k < 2:
        return residual.new_zeros(())
    z = F.normalize(residual, dim=-1)
    sq = (2 - 2 * z @ z.transpose(1, 2)).clamp_min(0)  # ||z_k - z_l||^2 of unit vectors
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=z.device), diagonal=1)
    return torch.exp(-2 * sq)[:, upper].mean()


def hardest_negative_triplet(
    sim: torch.Tensor, positive: torch.Tensor, margin: float = 0.2, hardest: bool = True
) -> torch.Tensor:
    """VSE++'s max-violation triplet loss in both directions with DivE's reduction (kdwonn/DivE ``loss.py``,
    ``AsymmetricTripletLoss.triplet_ranking_loss``, ``reduction='mean'``): the MEAN over the positive pairs
    (image i, caption c) of ``[m - s(i, c) + max_{c' not of i} s(i, c')]_+`` (image to text), plus the mean
    over them of ``[m - s(i, c) + max_{i' not of c} s(i', c)]_+`` (text to image). With every image's T
    captions in the batch, the first is the official mean over T x B, the second over the B x T captions.

    ``sim`` is images x captions, ``positive`` the same-shape mask (every caption of an image in the batch
    is a positive). A pair with no negative in a direction adds 0 there. ``hardest=False`` (VSE0, the
    official ``max_violation`` off, e.g. during ``warm_epoch``) averages the violations over every
    (positive pair, negative) combination of each direction instead.
    """
    if sim.shape != positive.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and positive {tuple(positive.shape)} must have the same shape")
    n_pos = positive.sum().clamp_min(1)
    if not hardest:
        pair = sim.unsqueeze(2)  # [i, c, 1]: the positive pair's score
        caption_side = F.relu(margin - pair + sim.unsqueeze(1))  # [i, c, c']: other captions of image i
        image_side = F.relu(margin - pair + sim.T.unsqueeze(0))  # [i, c, i']: other images of caption c
        is_pair = positive.unsqueeze(2)
        caption_mask = is_pair & ~positive.unsqueeze(1)
        image_mask = is_pair & ~positive.T.unsqueeze(0)
        return (caption_side * caption_mask).sum() / caption_mask.sum().clamp_min(1) + (
            image_side * image_mask
        ).sum() / image_mask.sum().clamp_min(1)
    negatives = sim.masked_fill(positive, -math.inf)
    hard_caption = negatives.max(dim=1, keepdim=True).values  # per image
    hard_image = negatives.max(dim=0, keepdim=True).values  # per caption
    i2t = F.relu(margin - sim + hard_caption).masked_fill(~positive, 0).sum() / n_pos
    t2i = F.relu(margin - sim + hard_image).masked_fill(~positive, 0).sum() / n_pos
    return i2t + t2i


def mmd_exp_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Maximum mean discrepancy between the rows of ``x`` (N x D) and ``y`` (M x D) under DivE's kernel
    ``k(a, b) = exp(-0.5 ||a - b||)``: the distance itself, not its square (so this is a Laplacian-type
    kernel, not the Gaussian one). ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, biased (self-pairs kept).
    Follows ``AsymmetricTripletLoss.mmd_rbf_loss(gamma=0.5)`` of kdwonn/DivE ``loss.py``, reduction ``mean``.
    """

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
        dist = torch.where(sq > 0, sq, 1).sqrt() * (sq > 0)  # sqrt with a finite gradient at 0
        return torch.exp(-0.5 * dist).mean()

    return kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)
