"""DDP scaling of the training stage: the same global batch on 1, 2, ... processes (gloo on the CPU, NCCL on GPUs).

Runs `langdml train` (which relaunches itself under torchrun for `train.nproc` > 1) on the repository's
prepared default data in a scratch folder, one epoch per process count, and reads the epoch's images/s
from its log line. On a CPU the processes share the same cores (each gets cores / nproc
threads), so this measures the overhead of the distributed machinery, not a speed-up; on a machine with
one GPU per process it measures the scaling.

    .venv/bin/python benchmarks/ddp_scaling.py                    # nproc 1 and 2, params.yaml otherwise
    .venv/bin/python benchmarks/ddp_scaling.py --nproc 1 2 4 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WRITTEN = {"model", "checkpoint", "train", "eval"}


def run(nproc: int, epochs: int, workdir: Path, threads: int) -> tuple[float, float]:
    """(wall seconds, images/s of the last epoch) of one training run."""
    (workdir / "data").mkdir(parents=True)
    for entry in (REPO / "data").iterdir():
        if entry.name not in WRITTEN and not entry.name.startswith("."):
            (workdir / "data" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"nproc": nproc, "epochs": epochs, "num_workers": 0})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc))}
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(Path(sys.executable).parent / "langdml"), "train"], cwd=workdir, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"nproc={nproc} failed:\n{res.stderr[-3000:]}")
    # Timings stay out of the checkpoint (identical reruns give identical files): read the epoch log line.
    rates = re.findall(r"epoch \d+/\d+: .*?([0-9.]+) images/s", res.stderr)
    if not rates:
        raise SystemExit(f"nproc={nproc}: no epoch line in the log:\n{res.stderr[-3000:]}")
    return wall, float(rates[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="langdml-ddp-"))
    try:
        rows = [(n, *run(n, args.epochs, scratch / f"n{n}", args.threads)) for n in args.nproc]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    print(f"`langdml train`, params.yaml's model and global batch, {args.epochs} epoch(s), {device}")
    print("| processes | wall (s) | images/s | step time vs 1 process |")
    print("|---|---|---|---|")
    base = rows[0][2]
    for n, wall, ips in rows:
        print(f"| {n} | {wall:.1f} | {ips:.1f} | {base / ips:.2f} |")


if __name__ == "__main__":
    main()
