"""One format for a trained model of either task: ``model.safetensors`` (the weights) and ``config.json``
(``format``, the ``task`` and what rebuilding the architecture needs), each written atomically.

:func:`save` writes it; :func:`load` reads it back through the task's own ``build(config)`` (no
pretrained download, so evaluation and serving never need a model hub). A model of the other task is one
line naming the loader it needs, read from ``task``, never guessed from the keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import LangdmlError, first_line
from stages.core.io import atomic_path, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = 2
# task -> (the stage that trains it, what a model of it is, and what to do with one where the other is wanted)
TASKS = {
    "dml": ("train", "an image-only model: text queries need the image-text model (`langdml imagetext-train`)"),
    "imagetext": ("imagetext-train", "an image-text model; load it with TextRetriever (`langdml search --text`)"),
}


def save(model: nn.Module, directory: str | Path, task: str, config: dict[str, Any]) -> None:
    """Weights and ``config.json`` (``{"format", "task", **config}``) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp))
    write_json(directory / CONFIG_NAME, {"format": FORMAT, "task": task, **config})


def load(
    directory: str | Path,
    task: str,
    build: Callable[[dict[str, Any]], nn.Module],
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``task`` model saved in ``directory``, rebuilt by ``build(config)``, its weights loaded; eval mode."""
    from safetensors.torch import load_model

    directory = Path(directory)
    stage = TASKS[task][0]
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights):
        if not p.is_file():
            raise LangdmlError(f"{p} does not exist (run `langdml {stage}` first)")
    try:
        config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        raise LangdmlError(f"{cfg_path} is unreadable ({err}); re-run `langdml {stage}`") from None
    saved = config.get("task") if isinstance(config, dict) else None
    if saved in TASKS and saved != task:
        raise LangdmlError(f"{directory} is {TASKS[saved][1]}")
    if saved != task or config.get("format") != FORMAT:
        raise LangdmlError(f"{cfg_path}: not a langdml {task} model of format {FORMAT}; re-run `langdml {stage}`")
    try:
        model = build(config)
    except (KeyError, TypeError, ValueError) as err:
        raise LangdmlError(f"{cfg_path} is incomplete ({first_line(err)}); re-run `langdml {stage}`") from None
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as err:
        raise LangdmlError(f"{weights} does not match {cfg_path}: {first_line(err)}") from None
    except Exception as err:  # safetensors' own errors (truncated file, bad header) have no common base
        raise LangdmlError(f"{weights} is unreadable ({first_line(err)}); re-run `langdml {stage}`") from None
    return model.to(device).eval(), config
