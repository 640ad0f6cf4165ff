"""Resumable per-epoch checkpoints: weights, optimiser, schedule, every RNG state and a fingerprint.

A checkpoint is only reused when its fingerprint (the training config and the hashes of the input
files) matches, which makes it safe as a DVC ``persist: true`` output. Everything is stored as
tensors and plain types, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.io import atomic_path, file_digest

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 3
# Keys of a task's train section that never change the weights: out of the fingerprint. The global batch,
# not the process count, decides a run, so a checkpoint of one process count resumes under another.
NEUTRAL_TRAIN_KEYS = frozenset({"num_workers", "log_every", "device", "nproc", "evaluate_every"})
EPOCH_SHAPED_SCHEDULES = frozenset({"cosine", "cosine_step"})  # the lr at epoch e depends on the epoch count


def train_section_fingerprint(train: Any) -> dict[str, Any]:
    """A task's train section (a params model with ``scheduler``) as the fingerprint reads it, one rule for
    both tasks: every key but the neutral ones, and ``epochs`` only where the schedule's shape depends on it,
    so raising ``epochs`` continues a finished run instead of starting over."""
    neutral = set(NEUTRAL_TRAIN_KEYS)
    if train.scheduler not in EPOCH_SHAPED_SCHEDULES:
        neutral.add("epochs")
    return train.model_dump(exclude=neutral)


def fingerprint_config(params: dict[str, Any], device_type: str, files: Sequence[Path]) -> dict[str, Any]:
    """What determines the trained weights: the params that decide them (keyed by their dvc.yaml names;
    each task says which), the device type (CPU and GPU kernels round differently) and the input files'
    hashes."""
    return {
        "format": CHECKPOINT_FORMAT,
        "params": params,
        "device": device_type,
        "inputs": [file_digest(p) for p in files],
    }


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain types, loadable with ``weights_only=True``."""
    py_version, py_state, py_gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def load_checkpoint(path: Path, expected: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's state if it was made by this config and inputs; None (logged why) otherwise."""
    if not path.is_file():
        log.info("no checkpoint at %s: starting fresh", path)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file must not stop a fresh run
        log.warning("checkpoint %s is unreadable (%s): starting fresh", path, str(err).splitlines()[0][:120])
        return None
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        log.warning("checkpoint %s is not a langdml checkpoint (%s): starting fresh", path, type(state).__name__)
        return None
    if state.get("fingerprint") != expected:
        old = state.get("config", {})
        flat_old, flat_new = _flat(old), _flat(config)
        changed = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
        log.info("checkpoint %s has a different training config (%s): starting fresh", path, ", ".join(changed))
        return None
    return state


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint config with its params one level up (``params.train`` -> ``train``), for messages."""
    params = config.get("params")
    rest = {k: v for k, v in config.items() if k != "params"}
    return {**rest, **params} if isinstance(params, dict) else rest


def save_checkpoint(path: Path, state: dict[str, Any], rng_states: list[dict[str, Any]] | None = None) -> None:
    """``state`` plus the RNG states (one per rank; this process's alone by default), written atomically
    (a kill never leaves half a checkpoint)."""
    buffer = io.BytesIO()  # torch.save names its zip records after the file: a temporary name would vary
    torch.save({**state, "rng": rng_states or [rng_state()]}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
