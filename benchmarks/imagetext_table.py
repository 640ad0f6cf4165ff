"""The README's cross-modal table: the K = 1 max-pooled baseline against DivE's K slots, per text tower,
over seeds.

Needs `dvc repro` to have built data/imagetext/{prepared,features}. Each run trains and evaluates in a
scratch folder that links to everything in data/ except what `imagetext-train` and `imagetext-evaluate` write; a text
tower other than params.yaml's gets its own `imagetext-features` cache first (scratch too). The same grid through
DVC is `dvc exp run --queue -S imagetext.model.head=maxpool,dive -S seed=0,1,2` (and
`-S imagetext.features.text_tower=...`, which re-runs imagetext_features once per tower).

    python benchmarks/imagetext_table.py --seeds 0 1 2
    python benchmarks/imagetext_table.py --towers frozen:sentence-transformers:all-MiniLM-L6-v2 bigru:glove:6B-50d
    python benchmarks/imagetext_table.py --set imagetext.train.image_lr_scale=1.0   # an ablation
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
WRITTEN = {"model", "checkpoint", "train", "eval"}  # under data/imagetext: what each run writes itself
KEYS = ["i2t/recall@1", "i2t/recall@5", "i2t/recall@10", "t2i/recall@1", "t2i/recall@5", "t2i/recall@10", "rsum"]


def _workdir(params: dict, workdir: Path, features: Path | None) -> Path:
    """A scratch project: params.yaml, links to data/ but what the stages write (and ``features``)."""
    xm = workdir / "data" / "imagetext"
    xm.mkdir(parents=True)
    for entry in (REPO / "data").iterdir():
        if entry.name != "imagetext":
            (workdir / "data" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for entry in (REPO / "data" / "imagetext").iterdir():
        if entry.name not in WRITTEN and not (features is None and entry.name == "features"):
            (xm / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    if features is not None and features != REPO / "data" / "imagetext" / "features":
        (xm / "features").unlink()
        (xm / "features").symlink_to(features, target_is_directory=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return xm


def _langdml(stage: str, workdir: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(
        [str(Path(sys.executable).parent / "langdml"), stage], cwd=workdir, capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(f"langdml {stage} failed in {workdir}:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def cache_features(params: dict, workdir: Path) -> Path:
    """``imagetext-features`` for params' text tower in a scratch project; the folder it wrote."""
    xm = _workdir(params, workdir, None)
    _langdml("imagetext-features", workdir)
    return xm / "features"


def run_one(params: dict, workdir: Path, features: Path) -> tuple[dict[str, float], float]:
    """(the metrics, seconds of imagetext-train) of one run."""
    xm = _workdir(params, workdir, features)
    seconds = _langdml("imagetext-train", workdir)
    _langdml("imagetext-evaluate", workdir)
    return json.loads((xm / "eval" / "metrics.json").read_text()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--slots", type=int, default=4, help="K of the DivE rows")
    ap.add_argument("--set", nargs="*", default=[], help="key=value params for every run (an ablation)")
    ap.add_argument("--towers", nargs="+", default=None, help="text towers (default: params.yaml's)")
    args = ap.parse_args()
    for name in ("prepared", "features"):
        if not (REPO / "data" / "imagetext" / name).exists():
            raise SystemExit(f"data/imagetext/{name} is missing: run `dvc repro` first")
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
    cached = base["imagetext"]["features"]["text_tower"]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="langdml-imagetext-"))
    epochs = base["imagetext"]["train"]["epochs"]
    try:
        for tower in args.towers or [cached]:
            tower_params = json.loads(json.dumps(base))
            tower_params["imagetext"]["features"]["text_tower"] = tower
            features = REPO / "data" / "imagetext" / "features"
            if tower != cached:
                features = cache_features(tower_params, scratch / f"features-{len(rows)}")
            for name, model in configs:
                for seed in args.seeds:
                    params = json.loads(json.dumps(tower_params))
                    params["seed"] = seed
                    params["imagetext"]["model"].update(model)
                    metrics, seconds = run_one(params, scratch / f"{len(rows)}", features)
                    row = {"tower": tower, "config": name, "seed": seed, "s/epoch": seconds / epochs}
                    rows.append({**row, **{k: metrics[k] for k in KEYS}})
                    print(f"{tower} | {name:16s} seed={seed} rsum={metrics['rsum']:.1f} ({seconds:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cols = [*KEYS, "s/epoch"]
    table = (
        pl.DataFrame(rows)
        .group_by("tower", "config", maintain_order=True)
        .agg([pl.col(k).mean().alias(f"{k} mean") for k in cols] + [pl.col(k).std().alias(f"{k} std") for k in cols])
    )
    print(f"\n(percent; mean ± std over seeds {args.seeds}; s/epoch: train wall time / epochs, start-up included)")
    print("| text tower | configuration | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in table.iter_rows(named=True):
        cells = [f"{r[f'{k} mean']:.1f} ± {r[f'{k} std']:.1f}" for k in KEYS] + [f"{r['s/epoch mean']:.2f}"]
        print(f"| `{r['tower']}` | {r['config']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
