"""Images per second of the PLG classifier pass (the slow part of `langdml pseudo-labels`).

Uses the prepared training manifest when it exists (data/prepared/train.parquet), otherwise
synthetic 28 x 28 grey images, and times ``class_mean_outputs`` for each batch size and
worker count. Runs on CUDA (with AMP) when present.

    .venv/bin/python benchmarks/pseudo_labels_throughput.py --images 256 --batch-sizes 32 64 --workers 0 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class SyntheticImages:
    """Deterministic random grey images (image i depends on i only), five labels in turn."""

    def __init__(self, n: int, size: int, transform: Callable[[Image.Image], Any]) -> None:
        self.n, self.size, self.transform = n, size, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        pixels = np.random.default_rng(i).integers(0, 256, (self.size, self.size), dtype=np.uint8)
        return self.transform(Image.fromarray(pixels).convert("RGB")), i % 5


def make_dataset(manifest: Path, n: int, size: int, transform: Callable[[Image.Image], Any]) -> tuple[Any, str]:
    if manifest.is_file():
        from stages.core.artifacts import load_manifest
        from stages.core.data.torch_dataset import ImageDataset

        table, root = load_manifest(manifest)
        table = table.slice(0, min(n, table.num_rows))
        return ImageDataset(table, root, transform), f"{manifest} ({table.num_rows} images)"
    return SyntheticImages(n, size, transform), f"synthetic {size}x{size} ({n} images)"


def main() -> None:
    import torch

    from stages.core.language.imagenet import class_mean_outputs, create_classifier
    from stages.core.runtime import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="efficientnet-lite0")
    parser.add_argument("--manifest", type=Path, default=Path("data/prepared/train.parquet"))
    parser.add_argument("--images", type=int, default=256, help="images per measurement")
    parser.add_argument("--synthetic-size", type=int, default=28)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    model, transform = create_classifier(args.classifier, device)
    dataset, source = make_dataset(args.manifest, args.images, args.synthetic_size, transform)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"classifier {args.classifier} on {name}; images: {source}")
    warm = torch.utils.data.Subset(dataset, range(min(len(dataset), max(args.batch_sizes))))
    class_mean_outputs(model, warm, batch_size=max(args.batch_sizes), device=device, progress=False)

    print(f"| {'device':<6} | {'batch':>5} | {'workers':>7} | {'images/s':>9} |")
    print(f"|{'-' * 8}|{'-' * 6}:|{'-' * 8}:|{'-' * 10}:|")
    for batch_size in args.batch_sizes:
        for workers in args.workers:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            class_mean_outputs(
                model, dataset, batch_size=batch_size, num_workers=workers, device=device, progress=False
            )
            rate = len(dataset) / (time.perf_counter() - start)
            print(f"| {device.type:<6} | {batch_size:>5} | {workers:>7} | {rate:>9.1f} |", flush=True)


if __name__ == "__main__":
    main()
