"""Language matching (the paper's KL regulariser) and the base DML losses by name.

``language_matching`` follows the official ``LanguageGuide``/``kl_div`` of
ExplainableML/LanguageGuidance_for_DML: same-class entries of both similarity matrices are
masked to ``1 + gamma``, the language side is shifted by ``gamma`` and carries no gradient,
and the row-wise KL is summed, scaled by ``T^2 / B``.

Base losses come from pytorch-metric-learning; each registered factory returns a
:class:`DMLLoss` (loss + miner) that also says which of its parameters need their own
optimiser group (margin's beta, proxy-anchor's proxies). A factory takes an optional PML
``distance``, so a set similarity plugs in under every loss and miner unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import LangdmlError
from stages.core.registry import Registry
from stages.core.similarity import Similarity, cosine, smooth_chamfer


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
    similarity: Similarity = cosine,
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


def slot_diversity(residual: torch.Tensor) -> torch.Tensor:
    """DivE's slot-diversity regulariser: per sample, the mean over slot pairs k < l of
    exp(-2 ||z_k - z_l||^2) with z the L2-normalised slot residuals (B x K x D); averaged over the batch.
    Near 1 when the slots coincide, near exp(-4) when they are opposite; 0 for a single slot."""
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
    """VSE++'s max-violation triplet loss in both directions, summed over the positive pairs (as VSE++ and
    DivE sum over the batch): for each positive (image i, caption c),
    ``[m - s(i, c) + max_{c' not of i} s(i, c')]_+ + [m - s(i, c) + max_{i' not of c} s(i', c)]_+``.

    ``sim`` is images x captions, ``positive`` the same-shape mask (every caption of an image in the batch
    is a positive, so an image that appears twice is no negative of its own captions). A row or column
    with no negative adds nothing. ``hardest=False`` sums the violations of every negative instead (VSE0),
    what VSE-infinity trains with in its first epoch before the hardest negatives take over.
    """
    if sim.shape != positive.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and positive {tuple(positive.shape)} must have the same shape")
    if not hardest:
        pair = sim.unsqueeze(2)  # [i, c, 1]: the positive pair's score
        caption_side = F.relu(margin - pair + sim.unsqueeze(1))  # [i, c, c']: other captions of image i
        image_side = F.relu(margin - pair + sim.T.unsqueeze(0))  # [i, c, i']: other images of caption c
        is_pair = positive.unsqueeze(2)
        return (caption_side * (is_pair & ~positive.unsqueeze(1))).sum() + (
            image_side * (is_pair & ~positive.T.unsqueeze(0))
        ).sum()
    negatives = sim.masked_fill(positive, -math.inf)
    hard_caption = negatives.max(dim=1, keepdim=True).values  # per image
    hard_image = negatives.max(dim=0, keepdim=True).values  # per caption
    cost = F.relu(margin - sim + hard_caption) + F.relu(margin - sim + hard_image)
    return cost.masked_fill(~positive, 0).sum()


def mmd_exp_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Maximum mean discrepancy between the rows of ``x`` (N x D) and ``y`` (M x D) under DivE's kernel
    ``k(a, b) = exp(-0.5 ||a - b||)``: the distance itself, not its square (so this is a Laplacian-type
    kernel, not the Gaussian one). ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, biased (self-pairs kept).
    """

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
        dist = torch.where(sq > 0, sq, 1).sqrt() * (sq > 0)  # sqrt with a finite gradient at 0
        return torch.exp(-0.5 * dist).mean()

    return kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)


class _SetDistanceMixin:
    """Rows are flattened sets (B x K*D); each is reshaped to K unit slots before smooth-Chamfer."""

    slots: int
    alpha: float

    def _sets(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.reshape(x.shape[0], self.slots, -1), dim=-1)

    def _similarity(self, query_emb: torch.Tensor, ref_emb: torch.Tensor, centered: bool) -> torch.Tensor:
        return smooth_chamfer(self._sets(query_emb), self._sets(ref_emb), alpha=self.alpha, centered=centered)

    def _paired(self, query_emb: torch.Tensor, ref_emb: torch.Tensor, centered: bool) -> torch.Tensor:
        """smooth-Chamfer of row i with row i (what PML's ``pairwise_distance`` asks)."""
        s = self.alpha * torch.einsum("nkd,nld->nkl", self._sets(query_emb), self._sets(ref_emb))
        sc = (torch.logsumexp(s, dim=2).mean(dim=1) + torch.logsumexp(s, dim=1).mean(dim=1)) / (2 * self.alpha)
        return sc - (2 * math.log(self.slots)) / (2 * self.alpha) if centered else sc


def set_distance(like: Any, slots: int, alpha: float) -> Any:
    """A pytorch-metric-learning distance over flattened sets in the form of ``like`` (the loss's own
    default): a similarity (smooth-Chamfer) where the loss compares by similarity, an L2-like distance
    sqrt(2 - 2 SC_centred) where it compares by distance (margin loss and its distance-weighted miner)."""
    from pytorch_metric_learning.distances import BaseDistance, LpDistance

    class SmoothChamferSimilarity(_SetDistanceMixin, BaseDistance):
        def __init__(self) -> None:
            super().__init__(normalize_embeddings=False, is_inverted=True)
            self.slots, self.alpha = slots, alpha

        def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return self._similarity(query_emb, ref_emb, centered=False)

        def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return self._paired(query_emb, ref_emb, centered=False)

    class SmoothChamferL2(_SetDistanceMixin, LpDistance):
        def __init__(self) -> None:
            super().__init__(normalize_embeddings=True, p=2, power=1)  # what the miner asserts
            self.slots, self.alpha = slots, alpha

        def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return (2 - 2 * self._similarity(query_emb, ref_emb, centered=True)).clamp_min(1e-12).sqrt()

        def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
            return (2 - 2 * self._paired(query_emb, ref_emb, centered=True)).clamp_min(1e-12).sqrt()

    return SmoothChamferSimilarity() if like.is_inverted else SmoothChamferL2()


class DMLLoss(nn.Module):
    """A PML loss with its optional miner; labels must be dense 0..C-1 (proxies index by them).

    Set embeddings (B x K x D) are handed to PML as B x K*D rows, which only a set distance (one made by
    :func:`set_distance`, reshaping each row back to K slots) may compare: anything else is an error.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, lr: float | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.lr = lr
        object.__setattr__(self, "_loss_fn", loss)
        object.__setattr__(self, "_miner_fn", miner)

    def distribute(self) -> None:
        """Loss and miner over the global batch (pytorch-metric-learning's wrappers gather the other ranks'
        embeddings; the loss comes back multiplied by the world size, for DDP's gradient averaging)."""
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        # Not registered as submodules: the state dict keeps the plain loss's keys, so a checkpoint resumes
        # under any process count.
        object.__setattr__(self, "_loss_fn", DistributedLossWrapper(self.loss))
        if self.miner is not None:
            object.__setattr__(self, "_miner_fn", DistributedMinerWrapper(self.miner))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim == 3:
            if not isinstance(self.loss.distance, _SetDistanceMixin):
                raise ValueError("set embeddings (B x K x D) need a set distance (losses.set_distance)")
            embeddings = embeddings.flatten(1)
        pairs = self._miner_fn(embeddings, labels) if self._miner_fn is not None else None
        return self._loss_fn(embeddings, labels, pairs)

    def param_groups(self) -> list[dict[str, Any]]:
        """The loss's own learnable parameters as one optimiser group with its own lr (no weight decay)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0, "name": "loss"}
        if self.lr is not None:
            group["lr"] = self.lr
        return [group]


DMLFactory = Callable[..., DMLLoss]
DML_LOSSES: Registry[DMLFactory] = Registry("DML loss")


# Arguments every factory receives from the code, not from ``losses.<name>`` in params.yaml.
_INJECTED = ("num_classes", "embed_dim", "distance")


def check_loss_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """``losses.<name>`` names a registered loss and holds only keywords its factory takes."""
    factory = DML_LOSSES.get(name)
    signature = inspect.signature(factory)
    allowed = [p for p in signature.parameters if p not in _INJECTED]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise LangdmlError(f"losses.{name}.{unknown[0]}: unknown keyword; allowed keys: {', '.join(allowed)}")


def build_dml_loss(
    name: str,
    num_classes: int,
    embed_dim: int,
    kwargs: dict[str, Any] | None = None,
    *,
    distance: Any = None,
    slots: int | None = None,
    alpha: float = 16.0,
) -> DMLLoss:
    """Look ``name`` up and pass ``params.losses[name]``; ``distance`` (a PML distance) replaces the
    loss's and miner's default when given. ``slots``: the embeddings are sets of that many
    ``embed_dim``-d slots, compared by smooth-Chamfer (temperature ``alpha``) in the loss's own form."""
    kwargs = dict(kwargs or {})
    check_loss_kwargs(name, kwargs)
    factory = DML_LOSSES.get(name)
    if slots is None:
        return factory(num_classes, embed_dim, distance=distance, **kwargs)
    with torch.random.fork_rng(devices=[]):  # a throwaway build: it must not move the RNG (proxies' init)
        like = factory(num_classes, embed_dim, **kwargs).loss.distance
    return factory(num_classes, slots * embed_dim, distance=set_distance(like, slots, alpha), **kwargs)


def _with(distance: Any) -> dict[str, Any]:
    """The PML keyword that swaps the distance, or nothing (each loss keeps its own default)."""
    return {} if distance is None else {"distance": distance}


@DML_LOSSES.register("multisimilarity")
def _multisimilarity(
    num_classes: int,
    embed_dim: int,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    distance: Any = None,
) -> DMLLoss:
    from pytorch_metric_learning import losses, miners

    return DMLLoss(
        losses.MultiSimilarityLoss(alpha, beta, base, **_with(distance)),
        miners.MultiSimilarityMiner(epsilon, **_with(distance)),
    )


@DML_LOSSES.register("margin")
def _margin(
    num_classes: int,
    embed_dim: int,
    margin: float = 0.2,
    beta: float = 1.2,
    nu: float = 0.0,
    beta_lr: float = 5e-4,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    distance: Any = None,
) -> DMLLoss:
    """Per-class learnable beta (as in Roth et al.'s margin loss), trained with ``beta_lr``."""
    from pytorch_metric_learning import losses, miners

    loss = losses.MarginLoss(
        margin=margin, nu=nu, beta=beta, learn_beta=True, num_classes=num_classes, **_with(distance)
    )
    return DMLLoss(loss, miners.DistanceWeightedMiner(cutoff, nonzero_loss_cutoff, **_with(distance)), lr=beta_lr)


@DML_LOSSES.register("triplet")
def _triplet(num_classes: int, embed_dim: int, margin: float = 0.2, distance: Any = None) -> DMLLoss:
    from pytorch_metric_learning import losses, miners

    return DMLLoss(
        losses.TripletMarginLoss(margin=margin, **_with(distance)),
        miners.TripletMarginMiner(margin, type_of_triplets="semihard", **_with(distance)),
    )


@DML_LOSSES.register("contrastive")
def _contrastive(
    num_classes: int, embed_dim: int, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: Any = None
) -> DMLLoss:
    from pytorch_metric_learning import losses

    return DMLLoss(losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, **_with(distance)))


@DML_LOSSES.register("proxy_anchor")
def _proxy_anchor(
    num_classes: int,
    embed_dim: int,
    margin: float = 0.1,
    alpha: float = 32.0,
    lr: float | None = None,
    distance: Any = None,
) -> DMLLoss:
    """Proxies get their own lr (Kim et al. use 100x the backbone's); None falls back to train.head_lr."""
    from pytorch_metric_learning import losses

    return DMLLoss(losses.ProxyAnchorLoss(num_classes, embed_dim, margin=margin, alpha=alpha, **_with(distance)), lr=lr)
