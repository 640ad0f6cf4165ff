"""The training loop: class-balanced batches, L = L_DML + omega * L_match, resumable checkpoints.

Reproducibility is built from explicit state: every batch and every per-image augmentation seed
comes from a NumPy generator seeded by (seed, epoch), and the global torch/NumPy/Python RNG
states (used by dropout, drop-connect and PML miners) are stored in the per-epoch checkpoint.
So a run killed anywhere and re-run resumes at the last finished epoch and, with
``train.deterministic``, ends with the same weights as an uninterrupted run.

A checkpoint is only reused when its fingerprint (the training-relevant params and the hashes
of the input files) matches, which makes it safe as a DVC ``persist: true`` output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stages.core.errors import LangdmlError
from stages.core.io import atomic_path
from stages.core.language_targets import LanguageSources, LanguageTarget, build_language_targets, cache_files
from stages.core.losses import DMLLoss, build_dml_loss, language_matching
from stages.core.runtime import resolve_device, seed_everything
from stages.core.vision import EmbeddingModel, build_model, save_model, train_transform
from stages.params import Params, TrainParams

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
PARTS = ("dml", "language")
# Train params that never change the weights: excluded from the fingerprint.
_NEUTRAL_TRAIN_KEYS = {"num_workers", "log_every", "device"}


def language_kwargs(params: Params) -> dict[str, Any]:
    """The keyword arguments of ``language_matching`` that params.yaml sets."""
    return params.language.model_dump(include={"gamma", "temperature", "direction"})


@dataclass(frozen=True)
class TrainPaths:
    checkpoint: Path
    model_dir: Path
    log_dir: Path
    class_embeddings: Path
    pseudolabels: Path


@dataclass
class TrainResult:
    epochs_trained: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)


class ClassBalancedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``batch_size / m`` distinct classes times ``m`` images (as PML's MPerClassSampler).

    Each item is ``(index, augmentation seed)``; everything is drawn from a generator seeded by
    (seed, epoch), so an epoch is reproducible from two integers, whatever happened before it.
    """

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, num_batches: int, seed: int) -> None:
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        self.by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        self.m = m
        self.classes_per_batch = batch_size // m
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0
        if len(classes) < self.classes_per_batch:
            raise LangdmlError(
                f"train.batch_size / train.samples_per_class = {self.classes_per_batch} classes per batch, "
                f"but the training split has only {len(classes)} classes; lower train.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.by_class), self.classes_per_batch, replace=False)
            idx = np.concatenate(
                [rng.choice(self.by_class[c], self.m, replace=len(self.by_class[c]) < self.m) for c in chosen]
            )
            seeds = rng.integers(0, 2**63 - 1, size=len(idx))
            yield list(zip(idx.tolist(), seeds.tolist(), strict=True))


class SeededSamples(Dataset):
    """``base[index]`` with torch's RNG seeded per item (augmentations), labels made dense 0..C-1.

    The seed travels with the index, so results do not depend on workers or their persistence.
    """

    def __init__(self, base: Dataset, class_ids: np.ndarray) -> None:
        self.base = base
        self.dense = {int(c): i for i, c in enumerate(class_ids.tolist())}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x, label = self.base[index]
        return x, self.dense[int(label)]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_config(params: Params, device_type: str, files: Sequence[Path]) -> dict[str, Any]:
    """What determines the trained weights. ``epochs`` is left out unless the schedule depends on it,
    so raising ``epochs`` continues a finished run instead of starting over."""
    neutral = set(_NEUTRAL_TRAIN_KEYS)
    if params.train.scheduler != "cosine":
        neutral.add("epochs")
    return {
        "format": CHECKPOINT_FORMAT,
        "seed": params.seed,
        "omega": params.omega,
        "model": params.model.model_dump(),
        "language": params.language.model_dump(),
        "train": params.train.model_dump(exclude=neutral),
        "loss_kwargs": params.losses.get(params.train.loss, {}),
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


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrainParams], Any]] = {
    "none": lambda opt, tp: None,
    "multistep": lambda opt, tp: torch.optim.lr_scheduler.MultiStepLR(opt, tp.milestones, gamma=tp.lr_decay),
    "cosine": lambda opt, tp: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp.epochs),
}


def build_optimizer(tp: TrainParams, model: EmbeddingModel, dml: DMLLoss) -> torch.optim.Optimizer:
    """Groups: backbone (lr), head (head_lr), the loss's own parameters (their lr, else head_lr)."""
    head_lr = tp.head_lr if tp.head_lr is not None else tp.lr
    groups: list[dict[str, Any]] = [
        {"params": list(model.backbone.parameters()), "lr": tp.lr, "name": "backbone"},
        {"params": list(model.head.parameters()), "lr": head_lr, "name": "head"},
    ]
    for g in dml.param_groups():
        groups.append({"lr": head_lr, **g})
    return _OPTIMIZERS[tp.optimizer](groups, lr=tp.lr, weight_decay=tp.weight_decay)


def _load_checkpoint(path: Path, expected: str, config: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        log.info("no checkpoint at %s: starting fresh", path)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file must not stop a fresh run
        log.warning("checkpoint %s is unreadable (%s): starting fresh", path, str(err).splitlines()[0][:120])
        return None
    if state.get("fingerprint") != expected:
        old = state.get("config", {})
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        log.info("checkpoint %s has a different training config (%s): starting fresh", path, ", ".join(changed))
        return None
    return state


def _weights_finite(modules: Sequence[torch.nn.Module]) -> bool:
    flags = [p.detach().isfinite().all() for m in modules for p in m.parameters()]
    return bool(torch.stack(flags).all())


class _Live:
    """dvclive per-epoch metrics, restarted and replayed from the checkpoint's history on every run,
    so the TSVs always hold exactly one row per finished epoch."""

    def __init__(self, log_dir: Path, history: list[dict[str, float]]) -> None:
        from dvclive import Live

        class FilesOnlyLive(Live):
            """Plain TSV/JSON files that dvc.yaml declares as plots. dvclive's repo probing is skipped:
            it is not needed without experiment saving, fails in a git repo with no commits, and
            would ``dvc init`` a plain git repository."""

            def _init_dvc(self) -> None:
                return None

        self.live = FilesOnlyLive(dir=str(log_dir), dvcyaml=None, save_dvc_exp=False, resume=False)
        for row in history:
            self.log(row)

    def log(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != "epoch":
                self.live.log_metric(name, value)
        self.live.next_step()

    def end(self) -> None:
        self.live.end()


def fit(
    params: Params,
    make_dataset: Callable[[Callable[[Any], Any]], Dataset],
    paths: TrainPaths,
    *,
    input_files: Sequence[Path] = (),
    class_names: dict[int, str] | None = None,
) -> TrainResult:
    """Train (or resume, or just re-export) and write the model; ``make_dataset(transform)`` must
    return a Dataset of ``(image tensor, original class id)`` with a ``labels`` array."""
    tp, mp = params.train, params.model
    device = resolve_device(tp.device)
    cuda = device.type == "cuda"
    gen = seed_everything(params.seed, tp.deterministic)

    model = build_model(mp)
    dataset = make_dataset(train_transform(mp.image_size, model.mean, model.std))
    labels = np.asarray(dataset.labels, dtype=np.int64)
    if len(labels) == 0:
        raise LangdmlError("the training manifest has no images; check dataset params and re-run `langdml prepare`")
    class_ids = np.unique(labels)
    sampler = ClassBalancedBatchSampler(
        labels, tp.samples_per_class, tp.batch_size, max(1, len(labels) // tp.batch_size), params.seed
    )
    sources = LanguageSources(class_ids, paths.class_embeddings, paths.pseudolabels, params.seed, class_names)
    targets = build_language_targets(params.language.guidance, params.omega, sources, device)
    files = [*input_files, *cache_files(params.language.guidance, params.omega, sources)]
    config = fingerprint_config(params, device.type, files)
    fp = fingerprint(config)

    dml = build_dml_loss(tp.loss, len(class_ids), mp.embed_dim, params.losses.get(tp.loss)).to(device)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(tp, model, dml)
    scheduler = _SCHEDULERS[tp.scheduler](optimizer, tp)

    state = _load_checkpoint(paths.checkpoint, fp, config)
    start, history = 0, []
    if state is not None and state["epoch"] > tp.epochs:
        log.info("checkpoint is at epoch %d, beyond train.epochs=%d: starting fresh", state["epoch"], tp.epochs)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        dml.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, history = int(state["epoch"]), list(state["history"])
        log.info("resuming from %s after epoch %d/%d", paths.checkpoint, start, tp.epochs)

    loader = DataLoader(
        SeededSamples(dataset, class_ids),
        batch_sampler=sampler,
        num_workers=tp.num_workers,
        pin_memory=cuda,
        persistent_workers=tp.num_workers > 0,
        # Own generator: creating an iterator must not consume the global RNG we checkpoint.
        generator=gen,
    )
    step_fn = TrainStep(
        forward=torch.compile(model) if tp.compile else model,
        dml=dml,
        targets=targets,
        optimizer=optimizer,
        omega=params.omega,
        lang_kwargs=language_kwargs(params),
        device=device,
        amp=cuda and tp.amp,
    )

    live = _Live(paths.log_dir, history)
    for epoch in range(start, tp.epochs):
        sampler.set_epoch(epoch)
        model.train()
        dml.train()
        row = _train_epoch(step_fn, loader, epoch, tp)
        if not _weights_finite([model, dml]):
            raise LangdmlError(
                f"model weights became non-finite in epoch {epoch + 1} although the losses were finite; "
                "lower train.lr or set train.amp: false (no checkpoint written)"
            )
        if scheduler is not None:
            scheduler.step()
        history.append(row)
        _save_checkpoint(paths.checkpoint, fp, config, epoch + 1, model, dml, optimizer, scheduler, history)
        live.log(row)
        log.info(
            "epoch %d/%d: dml %.4f language %.4f total %.4f, %.1f images/s",
            epoch + 1,
            tp.epochs,
            row["loss/dml"],
            row["loss/language"],
            row["loss/total"],
            row["images_per_s"],
        )
    live.end()
    save_model(model, mp, paths.model_dir)
    if start == tp.epochs:
        log.info("checkpoint already finished all %d epochs: re-exported the model", tp.epochs)
    return TrainResult(epochs_trained=tp.epochs - start, resumed_from=start, history=history)


class _EpochMeter:
    """Loss sums and the first non-finite step, kept on the device; read (one sync) only when asked."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, device=device)  # dml, language, total
        self.interval = torch.zeros(3, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_part = torch.zeros((), dtype=torch.long, device=device)
        self.steps = 0
        self.interval_steps = 0

    def add(self, parts: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(parts[:2])
        newly_bad = (self.first_bad < 0) & ~finite.all()
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_part = torch.where(newly_bad, finite[0].long(), self.bad_part)  # 0: dml is bad, 1: language
        self.sums += parts
        self.interval += parts
        self.steps += 1
        self.interval_steps += 1

    def check(self, epoch: int, epochs: int) -> None:
        """Stop at the first non-finite loss, before anything is checkpointed."""
        step = int(self.first_bad)
        if step >= 0:
            raise LangdmlError(
                f"non-finite {PARTS[int(self.bad_part)]} loss at epoch {epoch + 1}/{epochs}, step {step + 1}; "
                "no checkpoint written (lower train.lr, check the inputs, or set train.amp: false)"
            )

    def interval_means(self) -> list[float]:
        means = (self.interval / max(self.interval_steps, 1)).tolist()
        self.interval.zero_()
        self.interval_steps = 0
        return means

    def epoch_means(self) -> list[float]:
        return (self.sums / max(self.steps, 1)).tolist()


def _train_epoch(step_fn: TrainStep, loader: DataLoader, epoch: int, tp: TrainParams) -> dict[str, float]:
    """One pass over the loader; the per-epoch log row. Raises on a non-finite loss."""
    meter = _EpochMeter(step_fn.device)
    t0 = time.perf_counter()
    bar = _progress(loader, f"epoch {epoch + 1}/{tp.epochs}")
    for step, (x, y) in enumerate(bar):
        meter.add(step_fn(x, y), step)
        if (step + 1) % tp.log_every == 0:
            meter.check(epoch, tp.epochs)
            dml, lang, total = meter.interval_means()
            bar.set_postfix(dml=f"{dml:.4f}", lang=f"{lang:.4f}", total=f"{total:.4f}")
            log.debug("epoch %d step %d: dml %.4f language %.4f total %.4f", epoch + 1, step + 1, dml, lang, total)
    meter.check(epoch, tp.epochs)
    dml, lang, total = meter.epoch_means()
    seconds = time.perf_counter() - t0
    return {
        "epoch": float(epoch + 1),
        "loss/dml": dml,
        "loss/language": lang,
        "loss/total": total,
        **{f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(step_fn.optimizer.param_groups)},
        "images_per_s": meter.steps * tp.batch_size / seconds,
    }


@dataclass
class TrainStep:
    """One optimisation step of L = L_DML + omega * mean over targets of L_match.

    Returns the detached [dml, language, total] on the device: no host sync, so the caller
    decides when to look (every ``log_every`` steps). The benchmark times exactly this.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    dml: DMLLoss
    targets: list[LanguageTarget]
    optimizer: torch.optim.Optimizer
    omega: float
    lang_kwargs: dict[str, Any]
    device: torch.device
    amp: bool = False  # bf16 autocast for the forward pass (CUDA)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=True, memory_format=torch.channels_last if cuda else torch.preserve_format)
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            emb = self.forward(x)
        dml_loss = self.dml(emb, y)
        if self.targets:
            lang = torch.stack([language_matching(emb, y, t(y), **self.lang_kwargs) for t in self.targets]).mean()
        else:
            lang = torch.zeros((), device=self.device)
        total = dml_loss + self.omega * lang
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return torch.stack([dml_loss.detach(), lang.detach(), total.detach()]).float()


def _progress(loader: DataLoader, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def _save_checkpoint(
    path: Path,
    fp: str,
    config: dict[str, Any],
    epoch: int,
    model: EmbeddingModel,
    dml: DMLLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
) -> None:
    state = {
        "fingerprint": fp,
        "config": config,
        "epoch": epoch,
        "model": model.state_dict(),
        "loss": dml.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
