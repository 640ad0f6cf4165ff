"""Training images/s of the full stage (data + step) as a fraction of the model alone.

A synthetic dataset (random smooth images of a photo's size, e.g. CUB's ~500 x 375, as JPEG files and
a manifest) is written to a scratch folder, then cached with the ``cache_images`` stage's own code.
The same ``fit`` (ELG guidance, the default loss) then trains for ``--epochs`` epochs from three
sources, and the last epoch's images/s is read from its log row:

- ``model``: the batch is already on the device (a fixed tensor; only the labels come from the
  sampler): the model-only ceiling, same model, batch, optimiser and step.
- ``cache``: the decoded-image cache (``train.image_cache.enabled``): uint8 rows gathered in the
  DataLoader workers, crops / flips / normalisation of the whole batch on the device.
- ``files``: JPEG decoding and torchvision transforms per image in the DataLoader workers.

The table goes to stdout, the progress bars to stderr.

    .venv/bin/python benchmarks/train_throughput.py                  # this CPU: the default recipe, 64 px
    .venv/bin/python benchmarks/train_throughput.py --backbone timm:resnet50 --image-size 224 \\
        --batch-size 128 --images 5994 --classes 100 --workers 8          # a GPU: ResNet50, bf16, CUB-sized
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from stages.core.artifacts import MANIFEST_SCHEMA, write_class_embeddings
from stages.core.config import parse_params
from stages.core.data.image_cache import ImageCache, SquashResize, write_image_cache
from stages.core.data.torch_dataset import ImageDataset
from stages.core.data.train_images import CachedImages, DecodedImages, Pipeline, TrainData, TrainImages, whole_batch
from stages.core.data.transforms import eval_resize
from stages.core.dml.objective import TrainPaths, train_dml
from stages.core.runtime import resolve_device


def write_photos(folder: Path, n: int, classes: int, size: tuple[int, int], seed: int = 0) -> pa.Table:
    """``n`` JPEGs of about ``size`` (width, height +-10%): upsampled noise, so they compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        w, h = (int(s * rng.uniform(0.9, 1.1)) for s in size)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        name = f"{i:06d}.jpg"
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(folder / name, quality=90)
        rows.append((name, i % classes))
    return pa.table(
        {
            "path": [r[0] for r in rows],
            "image_bytes": pa.nulls(n, pa.binary()),
            "label": pa.array([r[1] for r in rows], pa.int64()),
            "class_name": [f"class {r[1]}" for r in rows],
            "super_class": pa.nulls(n, pa.string()),
        },
        schema=MANIFEST_SCHEMA,
    )


class OnDevice:
    """The model-only source: every batch is one fixed tensor already on the device."""

    def __init__(self, labels: np.ndarray, device: torch.device) -> None:
        self.labels = labels
        self.device = device

    def build(self, pipe: Pipeline) -> TrainData:
        fixed: dict[int, torch.Tensor] = {}

        def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
            n = len(x)
            if n not in fixed:
                fixed[n] = torch.randn(n, 3, pipe.image_size, pipe.image_size, device=device)
                if device.type == "cuda":
                    fixed[n] = fixed[n].contiguous(memory_format=torch.channels_last)
            return fixed[n]

        return TrainData(Labels(self.labels), self.labels, to_device, whole_batch)


class Labels(Dataset):
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.class_ids = np.unique(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.array([i for i, _ in items])
        return torch.zeros(len(index)), torch.from_numpy(np.searchsorted(self.class_ids, self.labels[index]))


def images_per_s(source: TrainImages, params: dict, workdir: Path, class_ids: list[int]) -> float:
    paths = TrainPaths(
        workdir / "ckpt" / "last.pt",
        workdir / "model",
        workdir / "logs",
        workdir / "ce.parquet",
        workdir / "pl.parquet",
    )
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(class_ids), 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"class {c}" for c in class_ids]
    write_class_embeddings(paths.class_embeddings, class_ids, names, names, emb, {"encoder": "random"})
    result = train_dml(parse_params(params).training, source, paths)
    return result.history[-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--photo-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    ap.add_argument("--epochs", type=int, default=2, help="the last epoch is timed (the first warms up)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--sources", nargs="+", default=["model", "cache", "files"], choices=["model", "cache", "files"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scratch = Path(tempfile.mkdtemp(prefix="langdml-throughput-"))
    try:
        t0 = time.perf_counter()
        table = write_photos(scratch / "photos", args.images, args.classes, tuple(args.photo_size))
        t1 = time.perf_counter()
        side = eval_resize(args.image_size)
        write_image_cache(
            ImageDataset(table, scratch / "photos", SquashResize(side)),
            scratch / "cache",
            side,
            {},
            num_workers=args.workers,
        )
        t2 = time.perf_counter()
        print(f"wrote {args.images} JPEGs in {t1 - t0:.1f} s; cached them at {side} px in {t2 - t1:.1f} s")
        params = {
            "omega": 1.0,
            "model": {"backbone": args.backbone, "pretrained": False, "image_size": args.image_size},
            "language": {"guidance": "elg"},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "device": args.device,
                "compile": args.compile,
                "log_every": 10**6,
                "augment": {"flip": True, "min_crop_scale": 0.08},
            },
        }
        labels = table["label"].to_numpy()
        class_ids = sorted(set(labels.tolist()))
        device = resolve_device(args.device)
        sources = {
            "model": lambda: OnDevice(labels, device),
            "cache": lambda: CachedImages(ImageCache(scratch / "cache")),
            "files": lambda: DecodedImages(lambda t: ImageDataset(table, scratch / "photos", t)),
        }
        rates = {}
        for name in args.sources:
            rates[name] = images_per_s(sources[name](), params, scratch / name, class_ids)
            print(f"{name}: {rates[name]:.1f} images/s")
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"\n{args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, {gpu}")
        print("| source | images/s | fraction of model-only |\n|---|---|---|")
        for name, rate in rates.items():
            frac = f"{rate / rates['model']:.2f}" if "model" in rates else "-"
            print(f"| {name} | {rate:.1f} | {frac} |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
