"""Interleaved median timing of training-step variants, shared by the step benchmarks.

Each variant runs ``warmup`` untimed steps, then ``steps`` timed rounds in alternating order, so that
drift in machine load hits every variant equally; CUDA work is synchronised around each step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stages.core.config import Params, load_params
from stages.core.runtime import resolve_device, seed_everything


def step_arguments(description: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every step benchmark takes; a script adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="parameter file (defaults if missing)")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps per variant")
    return ap


def setup(params_path: str) -> tuple[Params, torch.device, torch.Generator]:
    """params.yaml (defaults when absent), the training device and a seeded generator."""
    params = load_params(params_path) if Path(params_path).is_file() else Params()
    return params, resolve_device(params.train.device), seed_everything(params.seed)


def synthetic_batch(params: Params, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One class-balanced batch of random images at the model's size: (B x 3 x S x S, B labels)."""
    tp, size = params.train, params.model.image_size
    x = torch.randn(tp.batch_size, 3, size, size, generator=gen)
    y = torch.arange(tp.batch_size // tp.samples_per_class).repeat_interleave(tp.samples_per_class)
    return x, y


def interleaved_medians(
    variants: dict[str, Callable[[], dict[str, torch.Tensor]]], steps: int, warmup: int, cuda: bool
) -> dict[str, float]:
    """Median seconds per call of each variant; every call's loss terms must be finite."""

    def timed(step: Callable[[], dict[str, torch.Tensor]]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        terms = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        assert all(torch.isfinite(v) for v in terms.values()), "non-finite loss in the benchmark"
        return elapsed

    names = list(variants)
    for _ in range(warmup):
        for name in names:
            timed(variants[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(timed(variants[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def print_step_table(medians: dict[str, float], batch_size: int, title: str, device: torch.device) -> None:
    """The title with the device, then one row per variant: median step, images/s, ratio to the first."""
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{title}, {label}")
    base = next(iter(medians.values()))
    print(f"{'variant':<24} {'median step (ms)':>17} {'images/s':>10} {'vs first':>9}")
    for name, m in medians.items():
        print(f"{name:<24} {m * 1e3:>17.1f} {batch_size / m:>10.1f} {m / base:>9.3f}")
