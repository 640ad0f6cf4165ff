"""The language-matching term of Roth, Vinyals, Akata (CVPR 2022): a row-wise KL between the softmaxed
batch similarity matrices of the images and of their classes' frozen language embeddings.

Follows the official ``LanguageGuide`` / ``kl_div`` of ExplainableML/LanguageGuidance_for_DML
(``language_guidance.py``): same-class entries of both similarity matrices are masked to ``1 + gamma``,
the language side is shifted by ``gamma`` and carries no gradient, and the row-wise KL is summed,
scaled by ``T^2 / B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stages.core.model.similarity import COSINE, Similarity


def language_matching(
    img_emb: torch.Tensor,
    labels: torch.Tensor,
    lang_sim: torch.Tensor,
    *,
    gamma: float = 1.0,
    temperature: float = 1.0,
    target_temperature: float | None = None,
    same_class: str = "fill",
    direction: str = "backward",
    similarity: Similarity = COSINE,
) -> torch.Tensor:
    """T^2/B * sum_i KL(P_i || Q_i) (``backward``) or KL(Q_i || P_i) (``forward``).

    P = softmax(S_img masked / T), Q = softmax((lang_sim + gamma) masked / T_q) with T_q =
    ``target_temperature`` (None: T, the paper). ``same_class="fill"`` (the paper) sets same-class
    entries, the diagonal included, to 1 + gamma on both sides; ``"exclude"`` leaves them out of both
    softmaxes, so only the order among other classes is matched (a sharp T_q then cannot turn the term
    into "put all mass on the own class"); a row whose other entries are all same-class adds nothing.
    ``similarity(img_emb, img_emb)`` gives S_img (for sets, a centred smooth-Chamfer keeps the fill value
    1 + gamma above every other entry). At least float32, even under autocast.
    """
    if direction not in ("backward", "forward"):
        raise ValueError(f"direction must be 'backward' or 'forward', got {direction!r}")
    if same_class not in ("fill", "exclude"):
        raise ValueError(f"same_class must be 'fill' or 'exclude', got {same_class!r}")
    t_q = temperature if target_temperature is None else target_temperature
    dtype = torch.promote_types(img_emb.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
    with torch.autocast(device_type=img_emb.device.type, enabled=False):
        emb = img_emb.to(dtype)
        same = labels.view(-1, 1) == labels.view(1, -1)
        fill = 1.0 + gamma if same_class == "fill" else -math.inf
        s_img = similarity(emb, emb).masked_fill(same, fill)
        s_lang = (lang_sim.detach().to(dtype) + gamma).masked_fill(same, fill)
        rows = ~same.all(dim=1)  # "exclude": a row with no other class has nothing to match
        out = same[rows] if same_class == "exclude" else torch.zeros_like(same[rows])
        log_p = F.log_softmax(s_img[rows] / temperature, dim=-1).masked_fill(out, 0)
        log_q = F.log_softmax(s_lang[rows] / t_q, dim=-1).masked_fill(out, 0)
        a, b = (log_p, log_q) if direction == "backward" else (log_q, log_p)
        kl = (a.exp() * (a - b)).masked_fill(out, 0).sum()  # KL(A || B); excluded entries add nothing
        return kl * (temperature**2) / emb.shape[0]
