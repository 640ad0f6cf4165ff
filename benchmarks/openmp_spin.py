"""Two torch processes on the same cores, as the tests beside a `dvc repro` or `dvc queue start -j 2` run: the
training step of EfficientNet-Lite0 (batch 40 at 64 px, the default model) alone and in a pair, under libgomp's
default spin (300,000 iterations before a waiting thread sleeps) and under other ``GOMP_SPINCOUNT`` values, and
with one thread per process. Why the CLI sets ``GOMP_SPINCOUNT=1000`` (stages/cli.py).

    .venv/bin/python benchmarks/openmp_spin.py
    .venv/bin/python benchmarks/openmp_spin.py --steps 20 --spins default 1000 0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEP = """
import time, torch
from stages.core.language.imagenet import create_classifier
model, _ = create_classifier("efficientnet-lite0")
model.train()
x = torch.randn(40, 3, 64, 64)
model(x).sum().backward()
start = time.perf_counter()
for _ in range({steps}):
    model(x).sum().backward()
print((time.perf_counter() - start) / {steps})
"""


def step_times(env: dict[str, str], copies: int, steps: int) -> list[float]:
    """Each process's mean step seconds, ``copies`` processes started together."""
    code = STEP.format(steps=steps)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--spins", nargs="+", default=["default", "1000"], help="GOMP_SPINCOUNT values; default: unset")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    cases = [
        (f"GOMP_SPINCOUNT={s}" if s != "default" else "libgomp's default spin", {"GOMP_SPINCOUNT": s})
        for s in args.spins
    ]
    cases.append(("1 thread a process (OMP_NUM_THREADS=1)", {"OMP_NUM_THREADS": "1"}))
    print(f"EfficientNet-Lite0 training step, batch 40 at 64 px, {os.cpu_count()} cores; s/step (mean of {args.steps})")
    print("| setting | alone | each of two at once |")
    print("|---|---|---|")
    for name, extra in cases:
        env = {**base, **{k: v for k, v in extra.items() if v != "default"}}
        alone = step_times(env, 1, args.steps)[0]
        pair = step_times(env, 2, args.steps)
        print(f"| {name} | {alone:.3f} | {' / '.join(f'{t:.3f}' for t in pair)} |")


if __name__ == "__main__":
    main()
