"""Image-text retrieval with set embeddings (DivE's own task) on cached, frozen token features.

Both modalities are token sets: an image is the grid cells of a frozen backbone's last feature map, a
caption the token features of a frozen text encoder. A registered set head per modality (``dive``: K
slots by slot attention, the DML head's module; ``maxpool``: one max-pooled vector, the VSE-infinity-like
K=1 baseline) turns them into sets of unit vectors compared by smooth-Chamfer (exactly the cosine at
K=1). The objective returns named terms, as the DML one does: ``triplet`` (VSE++ hardest negatives in
both directions, every caption of an image in the batch a positive), ``mmd`` (DivE's kernel between all
image and all caption slots) and ``diversity`` (DivE's slot-diversity term, mean of both sides).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import distributed
from stages.core.checkpoint import fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from stages.core.config import CrossModalModelParams, CrossModalTrainParams
from stages.core.errors import LangdmlError
from stages.core.heads import DivEHead
from stages.core.io import atomic_path, write_json
from stages.core.live import LiveLog
from stages.core.losses import hardest_negative_triplet, mmd_exp_kernel, slot_diversity
from stages.core.registry import Registry
from stages.core.runtime import seed_everything
from stages.core.similarity import smooth_chamfer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class MaxPoolHead(nn.Module):
    """One vector per input: projected tokens (with DivE's residual MLP), max-pooled over the valid ones."""

    similarity = "cosine"
    slots = 1

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.local = nn.Linear(channels, embed_dim)
        self.local_mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.ReLU(), nn.Linear(embed_dim // 2, embed_dim)
        )

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        local = self.local(tokens)
        local = local + self.local_mlp(local)
        if mask is not None:
            local = local.masked_fill(mask.unsqueeze(-1), -math.inf)
        pooled = local.max(dim=1).values.unsqueeze(1)
        return {"embeddings": F.normalize(pooled.float(), dim=-1), "residual": pooled.float()}


SetHeadFactory = Callable[[int, CrossModalModelParams], nn.Module]
SET_HEADS: Registry[SetHeadFactory] = Registry("set head")


@SET_HEADS.register("dive")
def _dive(channels: int, mp: CrossModalModelParams) -> nn.Module:
    return DivEHead(channels, mp.embed_dim, slots=mp.slots, depth=mp.slot_depth, heads=mp.slot_heads, alpha=mp.alpha)


@SET_HEADS.register("maxpool")
def _maxpool(channels: int, mp: CrossModalModelParams) -> nn.Module:
    return MaxPoolHead(channels, mp.embed_dim)


@dataclass
class TokenSets:
    """Variable-length token sets stored ragged: ``tokens`` T x C (all sets' tokens one after another,
    float16, memory-mapped from disk) and ``offsets`` (N + 1; set i is ``tokens[offsets[i]:offsets[i+1]]``);
    ``index`` selects the sets this view shows (a split) without copying. Nothing is padded on disk:
    captions vary from 3 to 30 tokens, and padding would store mostly zeros."""

    tokens: np.ndarray
    offsets: np.ndarray
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    @property
    def channels(self) -> int:
        return int(self.tokens.shape[1])

    def subset(self, mask: np.ndarray) -> TokenSets:
        rows = np.flatnonzero(mask)
        return TokenSets(self.tokens, self.offsets, rows if self.index is None else self.index[rows])

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (float32, B x L x C, zero-padded to the longest) and the mask (True at padding) of ``rows``."""
        real = np.asarray(rows) if self.index is None else self.index[rows]
        starts, ends = self.offsets[real], self.offsets[real + 1]
        lengths = ends - starts
        out = np.zeros((len(real), int(lengths.max()), self.channels), dtype=np.float32)
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            out[i, : b - a] = self.tokens[a:b]
        mask = torch.arange(out.shape[1])[None, :] >= torch.as_tensor(lengths)[:, None]
        return torch.from_numpy(out).to(device), mask.to(device)


def ragged_token_sets(sets: list[np.ndarray]) -> TokenSets:
    """Variable-length L_i x C arrays -> one float16 T x C array and the offsets; an empty set is an error."""
    if not sets:
        raise LangdmlError("no token sets to store")
    empty = [i for i, s in enumerate(sets) if len(s) == 0]
    if empty:
        raise LangdmlError(f"{len(empty)} input(s) have no tokens, e.g. row {empty[0]}")
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    return TokenSets(np.concatenate(sets).astype(np.float16), offsets)


class CrossModalModel(nn.Module):
    """A set head per modality over cached token features."""

    def __init__(self, image_channels: int, text_channels: int, mp: CrossModalModelParams) -> None:
        super().__init__()
        self.params = mp
        self.image = SET_HEADS.get(mp.head)(image_channels, mp)
        self.text = SET_HEADS.get(mp.head)(text_channels, mp)
        self.similarity: str = self.image.similarity
        self.alpha = mp.alpha
        self.ctx = distributed.Context()  # one process until ``distribute``

    def score(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Images x captions smooth-Chamfer of the sets (the cosine for one slot each)."""
        return smooth_chamfer(images, captions, alpha=self.alpha)

    def distribute(self, ctx: distributed.Context) -> None:
        """Compute the terms on the global batch across ``ctx.world`` processes (call before DDP wraps it)."""
        self.ctx = ctx

    def forward(
        self,
        image_batch: tuple[torch.Tensor, torch.Tensor],
        text_batch: tuple[torch.Tensor, torch.Tensor],
        image_ids: torch.Tensor,
        caption_image_ids: torch.Tensor,
        margin: float,
        hardest: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Unweighted loss terms. The heads embed this process's rows; under DDP their outputs are gathered
        into the global batch (:func:`distributed.gather_rows`), whose ``*_ids`` say which image each row shows.
        Every term is then the one-process value; only this rank's rows carry gradient, so the caller scales
        the backward by the world size (DDP averages the ranks' gradients)."""
        img = self.image.forward_tokens(*image_batch)
        txt = self.text.forward_tokens(*text_batch)
        img_emb, txt_emb = self._gather(img["embeddings"]), self._gather(txt["embeddings"])
        img_res, txt_res = self._gather(img["residual"]), self._gather(txt["residual"])
        positive = image_ids[:, None] == caption_image_ids[None, :]
        dim = img_emb.shape[-1]
        return {
            "triplet": hardest_negative_triplet(self.score(img_emb, txt_emb), positive, margin, hardest),
            "mmd": mmd_exp_kernel(img_emb.reshape(-1, dim), txt_emb.reshape(-1, dim)),
            "diversity": (slot_diversity(img_res) + slot_diversity(txt_res)) / 2,
        }

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.gather_rows(x, self.ctx)


def term_weights(tp: CrossModalTrainParams) -> dict[str, float]:
    return {"triplet": 1.0, "mmd": tp.mmd, "diversity": tp.diversity}


@torch.no_grad()
def embed_sets(head: nn.Module, sets: TokenSets, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """N x K x D unit vectors of every token set."""
    head.eval()
    out = []
    for start in range(0, len(sets), batch_size):
        rows = np.arange(start, min(start + batch_size, len(sets)))
        out.append(head.forward_tokens(*sets.batch(rows, device))["embeddings"].float().cpu().numpy())
    return np.concatenate(out)


@dataclass
class CrossModalData:
    """Training inputs: image files' and captions' token sets, and which image id each row shows."""

    images: TokenSets
    image_ids: np.ndarray  # per image file (several files may show one image id)
    captions: TokenSets
    caption_image_ids: np.ndarray


@dataclass
class CrossModalPaths:
    model: Path
    checkpoint: Path
    logs: Path


def _views(image_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Image id -> the rows of its files (its views)."""
    order = np.argsort(image_ids, kind="stable")
    ids, starts = np.unique(image_ids[order], return_index=True)
    return {int(i): rows for i, rows in zip(ids, np.split(order, starts[1:]), strict=True)}


def _batches(
    caption_image_ids: np.ndarray,
    views: dict[int, np.ndarray],
    batch_size: int,
    seed: int,
    epoch: int,
    min_size: int = 2,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image file rows, caption rows) per global step: captions in a seeded random order, each with one
    file of its image drawn at random (the views of an image id). A last batch smaller than ``min_size`` is
    dropped: a lone caption has no negative, and under DDP every process needs a row."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(caption_image_ids))
    out = []
    for start in range(0, len(order) - (min_size - 1), batch_size):
        caps = order[start : start + batch_size]
        imgs = np.array([rng.choice(views[int(i)]) for i in caption_image_ids[caps]])
        out.append((imgs, caps))
    return out


def train_crossmodal(
    data: CrossModalData,
    mp: CrossModalModelParams,
    tp: CrossModalTrainParams,
    seed: int,
    device: torch.device,
    paths: CrossModalPaths,
    fingerprint_config: dict[str, Any],
) -> list[dict[str, float]]:
    """Train both set heads (AdamW, cosine schedule per step, gradient clipping), checkpointing every epoch
    and resuming from a checkpoint of the same config; export the model. Returns the per-epoch history.

    Under torchrun (``crossmodal.train.nproc``) every process draws the same global batches and embeds its
    contiguous share; the terms are computed on the gathered global batch, so a run depends on the global
    batch size, not on the process count. Rank 0 alone checkpoints, logs and exports."""
    ctx = distributed.setup(device.type)
    device = distributed.device_for(ctx, device)
    seed_everything(seed)
    if set(data.caption_image_ids.tolist()) - set(data.image_ids.tolist()):
        raise LangdmlError("some training captions show an image with no image file; re-run `langdml xm-prepare`")
    model = CrossModalModel(data.images.channels, data.captions.channels, mp).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    views = _views(data.image_ids)
    min_size = max(2, ctx.world)
    steps_per_epoch = len(range(0, len(data.caption_image_ids) - (min_size - 1), tp.batch_size))
    if steps_per_epoch <= 0:
        raise LangdmlError("the training split has fewer than 2 captions; nothing to train on")
    total = tp.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    weights = term_weights(tp)
    expected = fingerprint(fingerprint_config)
    state = load_checkpoint(paths.checkpoint, expected, fingerprint_config)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state["history"])
        rng = state["rng"]
        set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
        log.info("resuming cross-modal training after epoch %d of %d", start, tp.epochs)
    forward: Callable[..., dict[str, torch.Tensor]] = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model.distribute(ctx)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    live = LiveLog(paths.logs, history) if ctx.main else None
    for epoch in range(start, tp.epochs):
        model.train()
        sums: dict[str, float] = {}
        batches = _batches(data.caption_image_ids, views, tp.batch_size, seed, epoch, min_size)
        for step, (imgs, caps) in enumerate(batches):
            mine = np.array_split(np.arange(len(caps)), ctx.world)[ctx.rank]  # this rank's contiguous share
            terms = forward(
                data.images.batch(imgs[mine], device),
                data.captions.batch(caps[mine], device),
                torch.as_tensor(data.image_ids[imgs], device=device),
                torch.as_tensor(data.caption_image_ids[caps], device=device),
                tp.margin,
                hardest=epoch >= tp.warmup_epochs,
            )
            total_loss = sum(weights[name] * value for name, value in terms.items())
            if not torch.isfinite(total_loss):
                bad = next(n for n, v in terms.items() if not torch.isfinite(v))
                raise LangdmlError(
                    f"non-finite {bad} loss at epoch {epoch + 1}, step {step + 1}; lower crossmodal.train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            (total_loss * ctx.world).backward()  # DDP averages: the sum of the ranks' gradients is the global one
            torch.nn.utils.clip_grad_norm_(model.parameters(), tp.clip)
            optimizer.step()
            scheduler.step()
            for name, value in [*terms.items(), ("total", total_loss)]:
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        row = {f"loss/{k}": v / len(batches) for k, v in sums.items()}
        row["lr"] = scheduler.get_last_lr()[0]
        history.append(row)
        rng_states = distributed.gather_objects(rng_state(), ctx)
        if ctx.main:
            live.log(row)
            log.info("epoch %d/%d: %s", epoch + 1, tp.epochs, ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
            save_checkpoint(
                paths.checkpoint,
                {
                    "fingerprint": expected,
                    "config": fingerprint_config,
                    "epoch": epoch + 1,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                rng_states,
            )
        distributed.barrier(ctx)  # no rank starts an epoch whose checkpoint is not on disk
    if ctx.main:
        live.end()
        save_crossmodal(model, paths.model)
    distributed.barrier(ctx)
    distributed.teardown(ctx)
    return history


def save_crossmodal(model: CrossModalModel, directory: Path) -> None:
    """Weights as safetensors and the head config as JSON, each written atomically."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    channels = {"image_channels": model.image.local.in_features, "text_channels": model.text.local.in_features}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(directory / CONFIG_NAME, {"model": model.params.model_dump(), **channels})


def load_crossmodal(directory: Path, device: torch.device) -> CrossModalModel:
    from safetensors.torch import load_file

    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise LangdmlError(f"no cross-modal model in {directory}; run `langdml xm-train`")
    try:
        cfg = json.loads(cfg_path.read_text())
        model = CrossModalModel(cfg["image_channels"], cfg["text_channels"], CrossModalModelParams(**cfg["model"]))
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # a damaged file of either kind: one line naming the fix
        raise LangdmlError(
            f"{directory}: unreadable cross-modal model ({str(err).splitlines()[0]}); re-run `langdml xm-train`"
        ) from None
    return model.to(device).eval()


def save_token_sets(directory: Path, name: str, sets: TokenSets) -> None:
    np.save(directory / f"{name}_tokens.npy", sets.tokens)
    np.save(directory / f"{name}_offsets.npy", sets.offsets)


def load_token_sets(directory: Path, name: str) -> TokenSets:
    """``<name>_tokens.npy`` memory-mapped and ``<name>_offsets.npy`` from the features folder."""
    try:
        tokens = np.load(directory / f"{name}_tokens.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}_offsets.npy")
    except FileNotFoundError:
        raise LangdmlError(f"{directory} lacks the {name} features; run `langdml xm-features`") from None
    except ValueError as err:
        raise LangdmlError(f"{directory}: unreadable {name} features ({err}); re-run `langdml xm-features`") from None
    if tokens.ndim != 2 or offsets.ndim != 1 or len(offsets) < 2 or offsets[-1] != len(tokens):
        raise LangdmlError(f"{directory}: {name} features are inconsistent; re-run `langdml xm-features`")
    return TokenSets(tokens, offsets)
