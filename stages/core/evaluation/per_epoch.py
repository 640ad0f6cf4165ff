"""Test metrics during training, as the official language-guidance code takes them (ExplainableML/
LanguageGuidance_for_DML ``main.py``: the test set is evaluated after every epoch). Its summaries
(``utilities/logger.py``) report each metric's maximum over the epochs, each possibly from another epoch:
that is ``max_over_epochs/<metric>`` here, the protocol of the paper's tables. langdml reports the final
model's metrics as its main result, and beside them both summaries: ``max_over_epochs/...`` and every metric
of the best recall@1 epoch (``best_epoch/...``, one model), so a comparison with the paper can be like for
like and still honest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stages.core.evaluation.embedding import embed_dataset
from stages.core.evaluation.metrics import retrieval_metrics

PER_EPOCH_KS = (1, 2, 4, 8)
PREFIX = "test/"
BEST = "best_epoch/"
MAX = "max_over_epochs/"


def per_epoch_metrics(
    model: Any, dataset: Any, *, device: Any, seed: int, batch_size: int = 256, ks: Sequence[int] = PER_EPOCH_KS
) -> Callable[[int], dict[str, float]]:
    """The hook :func:`stages.core.training.fit.fit` calls: the model's test metrics (recall@k, MAP@R,
    R-precision, NMI) as ``test/<metric>``."""

    def evaluate(epoch: int) -> dict[str, float]:
        emb = embed_dataset(model, dataset, batch_size=batch_size, num_workers=0, device=device)
        metrics = retrieval_metrics(emb, query_labels=dataset.labels, ks=ks, seed=seed, similarity=model.similarity)
        return {f"{PREFIX}{k}": float(v) for k, v in metrics.items() if not k.startswith("n_")}

    return evaluate


def best_epoch(history: Sequence[dict[str, float]], key: str = "recall@1") -> dict[str, float]:
    """The official summary: every test metric of the epoch with the best ``key``, as ``best_epoch/<metric>``
    (with ``best_epoch/epoch``); empty when no epoch was evaluated."""
    rows = [r for r in history if f"{PREFIX}{key}" in r]
    if not rows:
        return {}
    best = max(rows, key=lambda r: r[f"{PREFIX}{key}"])  # the first of equal ones: the earliest epoch
    out = {f"{BEST}epoch": int(best["epoch"])}
    out.update({f"{BEST}{k.removeprefix(PREFIX)}": v for k, v in best.items() if k.startswith(PREFIX)})
    return out


def max_over_epochs(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The official summary (``utilities/logger.py``: ``np.max`` of each metric's per-epoch values): every
    test metric's maximum over the evaluated epochs, as ``max_over_epochs/<metric>``; empty when none was."""
    out: dict[str, float] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(PREFIX):
                name = f"{MAX}{key.removeprefix(PREFIX)}"
                out[name] = max(out.get(name, value), value)
    return out
