"""The README's cross-modal table: the K = 1 max-pooled baseline against DivE's K slots, over seeds.

Needs `dvc repro` to have built data/crossmodal/{prepared,features}. Each run trains and evaluates in a
scratch folder that links to everything in data/ except what `xm-train` and `xm-evaluate` write; the
same grid through DVC is `dvc exp run --queue -S crossmodal.model.head=maxpool,dive -S seed=0,1,2`.

    python benchmarks/crossmodal_table.py --seeds 0 1 2
    python benchmarks/crossmodal_table.py --set crossmodal.train.image_lr_scale=1.0   # an ablation
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
WRITTEN = {"model", "checkpoint", "train", "eval"}  # under data/crossmodal: what each run writes itself
KEYS = ["i2t/recall@1", "i2t/recall@5", "i2t/recall@10", "t2i/recall@1", "t2i/recall@5", "t2i/recall@10", "rsum"]


def run_one(params: dict, workdir: Path) -> dict[str, float]:
    xm = workdir / "data" / "crossmodal"
    xm.mkdir(parents=True)
    for entry in (REPO / "data").iterdir():
        if entry.name != "crossmodal":
            (workdir / "data" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for entry in (REPO / "data" / "crossmodal").iterdir():
        if entry.name not in WRITTEN:
            (xm / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    langdml = str(Path(sys.executable).parent / "langdml")
    for stage in ("xm-train", "xm-evaluate"):
        res = subprocess.run([langdml, stage], cwd=workdir, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"langdml {stage} failed in {workdir}:\n{res.stderr[-3000:]}")
    return json.loads((xm / "eval" / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--slots", type=int, default=4, help="K of the DivE rows")
    ap.add_argument("--set", nargs="*", default=[], help="key=value params for every run (an ablation)")
    args = ap.parse_args()
    for name in ("prepared", "features"):
        if not (REPO / "data" / "crossmodal" / name).exists():
            raise SystemExit(f"data/crossmodal/{name} is missing: run `dvc repro` first")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = base
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    configs = [
        ("maxpool, K = 1", {"head": "maxpool"}),
        (f"DivE, K = {args.slots}", {"head": "dive", "slots": args.slots}),
    ]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="langdml-xm-"))
    try:
        for name, model in configs:
            for seed in args.seeds:
                t0 = time.perf_counter()
                params = json.loads(json.dumps(base))
                params["seed"] = seed
                params["crossmodal"]["model"].update(model)
                metrics = run_one(params, scratch / f"{len(rows)}")
                rows.append({"config": name, "seed": seed, **{k: metrics[k] for k in KEYS}})
                print(
                    f"{name:16s} seed={seed} rsum={metrics['rsum']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = (
        pl.DataFrame(rows)
        .group_by("config", maintain_order=True)
        .agg([pl.col(k).mean().alias(f"{k} mean") for k in KEYS] + [pl.col(k).std().alias(f"{k} std") for k in KEYS])
    )
    print(f"\n(percent; mean ± std over seeds {args.seeds})")
    print("| configuration | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for r in table.iter_rows(named=True):
        print(f"| {r['config']} | " + " | ".join(f"{r[f'{k} mean']:.1f} ± {r[f'{k} std']:.1f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
