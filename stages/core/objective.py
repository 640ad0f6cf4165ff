"""The training objective: the model call and every loss term, returned by name.

``Objective`` owns the image encoder, the base DML loss (with its learnable parameters), the
language targets and the weight of each term; ``forward(images, labels)`` returns the unweighted
terms as a dict (``{"dml": ..., "language": ...}``), and ``weights`` says how the loop sums them,
as pytorch-metric-learning's ``MultipleLosses`` and open_clip's loss dict do. A new term (slot
diversity, MMD, a second tower's i2t/t2i) is one more entry here; the step function, the meter,
the logs and the non-finite stop iterate over whatever names come back. Being one ``nn.Module``
holding every trained parameter, it is also what a DDP wrapper wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stages.core.distributed import gather_all
from stages.core.language_targets import LanguageTarget
from stages.core.losses import DMLLoss, language_matching, slot_diversity
from stages.core.similarity import Similarity, cosine
from stages.core.vision import EmbeddingModel


class Objective(nn.Module):
    def __init__(
        self,
        model: EmbeddingModel,
        dml: DMLLoss,
        targets: list[LanguageTarget],
        *,
        omega: float,
        language_kwargs: dict[str, Any],
        image_similarity: Similarity = cosine,
        diversity: float = 0.0,
    ) -> None:
        """``image_similarity`` is S_img of the language term; ``diversity`` weighs DivE's slot-diversity
        term, which exists only for a head that exposes slot residuals (a set head)."""
        super().__init__()
        self.model = model
        self.dml = dml
        self.targets = targets
        self.language_kwargs = dict(language_kwargs)
        self.image_similarity = image_similarity
        self.weights: dict[str, float] = {"dml": 1.0, "language": float(omega), "diversity": float(diversity)}
        # Backward-only factors per term: under DDP the global-batch terms are scaled by the world size
        # (see stages/core/distributed.py); the reported values stay unscaled.
        self.gradient_scales: dict[str, float] = {}
        self.world = 1
        self._encode: Callable[[torch.Tensor], dict[str, Any]] = model.encode

    def distribute(self, world: int) -> None:
        """Global-batch base loss and language term across ``world`` processes (call before DDP wraps it)."""
        self.world = world
        self.dml.distribute()
        self.gradient_scales = {"dml": float(world), "language": float(world)}

    def compile_model(self) -> None:
        """``torch.compile`` the encoder's forward; state dicts keep the plain module's keys."""
        object.__setattr__(self, "_encode", torch.compile(self.model.encode))

    def param_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Backbone (lr), head (head_lr), the loss's own parameters (their lr, else head_lr)."""
        groups: list[dict[str, Any]] = [
            {"params": list(self.model.backbone.parameters()), "lr": lr, "name": "backbone"},
            {"params": list(self.model.head.parameters()), "lr": head_lr, "name": "head"},
        ]
        groups += [{"lr": head_lr, **g} for g in self.dml.param_groups()]
        return groups

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted loss terms; the losses run in float32 even when the encoder ran under autocast."""
        out = self._encode(images)
        with torch.autocast(images.device.type, enabled=False):
            emb = out["embeddings"].float()
            terms = {"dml": self.dml(emb, labels) / self.world, "language": self._language(emb, labels)}
            if "residual" in out:
                terms["diversity"] = slot_diversity(out["residual"].float())
            return terms

    def _language(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean matching loss over the targets (``both`` has two); zero without guidance."""
        if not self.targets:
            return torch.zeros((), device=emb.device)
        if self.world > 1:
            emb, labels = gather_all(emb, labels)
        losses = [
            language_matching(emb, labels, t(labels), similarity=self.image_similarity, **self.language_kwargs)
            for t in self.targets
        ]
        return torch.stack(losses).mean()


def weighted_total(
    terms: dict[str, torch.Tensor], weights: dict[str, float], scales: dict[str, float] | None = None
) -> torch.Tensor:
    """sum_name weight[name] * scale[name] * term[name] (scale 1 unless given), in the objective's order."""
    if not terms:
        raise ValueError("the objective returned no loss terms")
    scales = scales or {}
    parts = [weights[name] * scales.get(name, 1.0) * value for name, value in terms.items()]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
