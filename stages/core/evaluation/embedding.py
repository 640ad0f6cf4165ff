"""Run an embedding function over a dataset: the one inference loop of the evaluation stages and of the
image-text features stage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from stages.core.errors import LangdmlError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def embed_dataset(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset[Any],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    normalize: bool = True,
    dtype: Any = np.float32,
    precision: str = "float32",
) -> np.ndarray:
    """``fn`` (a model, or its ``pooled``) over ``dataset`` in order: float32, L2-normalised along the
    last axis; N x D for one vector per image, N x K x D for a set of K (never flattened).

    When ``fn`` is an ``nn.Module`` or one's bound method, the module is moved to ``device`` (its convolutions
    in channels_last: :func:`~stages.core.runtime.channels_last`) and put in eval mode for the loop (batch-norm
    statistics and dropout must not change what an image maps to), then given back its previous mode.
    ``precision``: float32 (both official codes evaluate so) or bfloat16 (autocast on CUDA; full precision on
    the CPU either way). ``normalize`` False keeps the raw outputs (feature maps as tokens); ``dtype``: each
    batch's rows are stored so (float16 halves a feature cache, batch by batch, never holding a float32 copy of
    the whole).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from stages.core.runtime import autocast, channels_last

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise LangdmlError("the dataset to embed is empty; check the test manifest (langdml prepare)")
    device = torch.device(device)
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    module = owner if isinstance(owner, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        channels_last(module.to(device)).eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode(), autocast(device, enabled=precision == "bfloat16"):
            for images, _ in tqdm(loader, desc="embed", unit="batch", disable=None):
                out = fn(images.to(device, non_blocking=True)).float()
                if out.ndim not in (2, 3):
                    raise LangdmlError(
                        f"the model gives outputs of shape {tuple(out.shape)}; expected B x D or B x K x D (a set)"
                    )
                rows = F.normalize(out, dim=-1) if normalize else out
                chunks.append(rows.cpu().numpy().astype(dtype, copy=False))
    finally:
        if module is not None:
            module.train(was_training)
    emb = np.concatenate(chunks)
    shape = " x ".join(str(d) for d in emb.shape[1:])
    log.info("embedded %d images into %s %s", emb.shape[0], shape, "dimensions" if normalize else "(raw outputs)")
    return emb
