"""DDP scaling of the training stage: the same global batch on 1, 2, ... processes (gloo on the CPU, NCCL on GPUs).

Runs the train stage through DVC (`dvc repro --single-item train`, which relaunches `langdml train` under torchrun
for `train.nproc` > 1) in a scratch DVC project holding this repository's pipeline and its precomputed outputs
(benchmarks/dvc_scratch.py), one run per process count, and reads the last epoch's images/s from the training
loop's row (the probe in each stage process records it). On a CPU the processes share the same cores (each gets
cores / nproc threads), so this measures the overhead of the distributed machinery, not a speed-up; on a machine
with one GPU per process it measures the scaling. Needs `make repro` first (the precomputed outputs).

    .venv/bin/python benchmarks/ddp_scaling.py                    # nproc 1 and 2, params.yaml otherwise
    .venv/bin/python benchmarks/ddp_scaling.py --nproc 1 2 4 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from dvc_scratch import REPO, new_project, repro, set_params

# What the train stage reads (dvc.yaml's deps), copied with dvc.lock; the dataset root is linked.
TRAIN_INPUTS = ("data/raw", "data/prepared", "data/language", "data/pseudolabels", "data/image_cache")


def run(nproc: int, epochs: int, workdir: Path, threads: int) -> tuple[float, float]:
    """(wall seconds of `dvc repro`, images/s of the last epoch) of one training run."""
    project = new_project(workdir, TRAIN_INPUTS)
    set_params(project, {"train.nproc": nproc, "train.epochs": epochs, "train.num_workers": 0})
    started = time.perf_counter()
    status, printed, records = repro(
        project, ["train"], single_item=True, env={"OMP_NUM_THREADS": str(max(1, threads // nproc))}
    )
    wall = time.perf_counter() - started
    if status:
        raise SystemExit(f"nproc={nproc}: dvc repro failed:\n{printed[-3000:]}")
    rows = [row for record in records if record["command"] == "train" for row in record["rows"]]
    if not rows:
        raise SystemExit(f"nproc={nproc}: the train stage recorded no epoch:\n{printed[-3000:]}")
    return wall, float(rows[-1]["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    args = ap.parse_args()
    missing = [name for name in TRAIN_INPUTS if not (REPO / name).exists()]
    if missing:
        raise SystemExit(f"ddp_scaling: run `make repro` first (missing: {', '.join(missing)})")
    scratch = Path(tempfile.mkdtemp(prefix="langdml-ddp-"))
    try:
        rows = [(n, *run(n, args.epochs, scratch / f"n{n}", args.threads)) for n in args.nproc]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    print(f"`dvc repro --single-item train`, params.yaml's model and global batch, {args.epochs} epoch(s), {device}")
    print("| processes | wall of dvc repro (s) | images/s | step time vs 1 process |")
    print("|---|---|---|---|")
    base = rows[0][2]
    for n, wall, ips in rows:
        print(f"| {n} | {wall:.1f} | {ips:.1f} | {base / ips:.2f} |")


if __name__ == "__main__":
    main()
