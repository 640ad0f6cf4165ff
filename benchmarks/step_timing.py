"""Interleaved median timing of training-step variants, shared by the step benchmarks.

Each variant runs ``warmup`` untimed steps, then ``steps`` timed rounds in alternating order, so that
drift in machine load hits every variant equally; CUDA work is synchronised around each step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
