"""S2SD, simultaneous similarity-based self-distillation (Roth et al., ICML 2021), as the language-guidance
code runs it (ExplainableML/LanguageGuidance_for_DML ``criteria/s2sd.py``): auxiliary high-dimensional
embedding heads ("targets") trained with the base loss on the backbone's pooled features, whose batch
similarities are distilled into the embedding's (the "source"), plus a distillation of the features' own
similarities. Named terms for the DML objective; the official total is

    (L_source + mean_t L_target_t) / 2 + w * mean_t KL(S_source, S_t) + feat_w * KL(S_source, S_features)

where the feature term starts after ``feat_delay`` iterations. (The language-guidance benchmark runs leave
``--loss_s2sd_w`` at its default, 0: only the feature term distils there.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def similarity_distillation(source: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``kl_div`` of the official ``criteria/s2sd.py``: T^2 / B * sum_i KL(softmax(target_i / T) || softmax(
    source_i / T)), rows of the B x B similarity matrices, summed then divided by B; no gradient reaches
    ``target``."""
    log_p_source = F.log_softmax(source / temperature, dim=-1)
    p_target = F.softmax(target.detach() / temperature, dim=-1)
    return F.kl_div(log_p_source, p_target, reduction="sum") * temperature**2 / source.shape[0]


def pooled_features(fmap: torch.Tensor, pool_aggr: bool) -> torch.Tensor:
    """B x C: global average pooling, plus global max pooling with ``pool_aggr`` (``--loss_s2sd_pool_aggr``)."""
    avg = fmap.mean(dim=(2, 3))
    return avg + fmap.amax(dim=(2, 3)) if pool_aggr else avg


class S2SD(nn.Module):
    """The target heads (two-layer MLPs on the pooled features, one per dimension) with their own base loss
    each, and the distillation terms. ``terms(source, labels, fmap)`` returns ``s2sd_target``,
    ``s2sd_distill`` and ``s2sd_features``, to be weighted 0.5, ``weight`` and ``feat_weight`` (the
    source's base loss is then weighted 0.5)."""

    def __init__(
        self,
        channels: int,
        target_dims: Sequence[int],
        make_loss: Callable[[int], nn.Module],
        *,
        temperature: float = 1.0,
        feat_distill: bool = True,
        feat_delay: int = 1000,
        pool_aggr: bool = False,
    ) -> None:
        super().__init__()
        self.targets = nn.ModuleList(
            nn.Sequential(nn.Linear(channels, d), nn.ReLU(), nn.Linear(d, d)) for d in target_dims
        )
        self.losses = nn.ModuleList(make_loss(d) for d in target_dims)
        self.temperature, self.feat_distill, self.feat_delay, self.pool_aggr = (
            temperature,
            feat_distill,
            feat_delay,
            pool_aggr,
        )
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))  # checkpointed: resumes exactly

    def terms(self, source: torch.Tensor, labels: torch.Tensor, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        features = pooled_features(fmap.float(), self.pool_aggr)
        source_sims = source @ source.T
        target_losses, distills = [], []
        for net, loss in zip(self.targets, self.losses, strict=True):
            target = F.normalize(net(features), dim=-1)
            target_losses.append(loss(target, labels))
            distills.append(similarity_distillation(source_sims, target @ target.T, self.temperature))
        out = {"s2sd_target": torch.stack(target_losses).mean(), "s2sd_distill": torch.stack(distills).mean()}
        if self.feat_distill and int(self.iterations) >= self.feat_delay:
            unit = F.normalize(features, dim=-1).detach()
            out["s2sd_features"] = similarity_distillation(source_sims, unit @ unit.T, self.temperature)
        else:
            out["s2sd_features"] = source.new_zeros(())
        if self.training:
            self.iterations += 1
        return out
