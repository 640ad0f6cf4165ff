"""The README's seed table: baseline, ELG, PLG, a sharpened ELG target and the two controls, over seeds.

Needs the precompute outputs of `dvc repro` (data/prepared, data/language, data/pseudolabels,
data/pretrained_eval). Each run trains and evaluates in a scratch folder that links to everything in
data/ except what training and evaluation write (so manifests whose images live under data/raw work),
and the repository's own data/ is left alone; the same grid through DVC is
`dvc exp run --queue -S 'omega=0,1,5' -S seed=0,1,2 && dvc queue start`. The table gives mean ± std
over seeds and, per configuration, the paired same-seed difference to the baseline (polars).

The shuffled and uniform controls run last, with the overrides of the best guided row (by mean recall@1)
and only the guidance swapped, so each control differs from that row in what the language says alone.

    python benchmarks/seed_table.py --seeds 0 1 2 --omegas 1 3 --sharpen 0.1
    python benchmarks/seed_table.py --grid dive --omegas 1        # linear vs DivE head, the DivE rows
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
NEEDED = ["prepared", "language", "pseudolabels", "pretrained_eval"]
WRITTEN = {"model", "checkpoint", "train", "eval"}  # what each run writes in its own scratch folder
KEYS = ["recall@1", "map@r"]
BASELINE = "baseline (omega=0)"


Row = tuple[str, dict[str, object]]


def grid(omegas: list[float], sharpen: list[float], same_class: str) -> list[Row]:
    """(row name, parameter overrides) for the guided rows of the language table; the controls follow."""
    rows: list[Row] = [(BASELINE, {"omega": 0.0, "language.guidance": "none"})]
    for guidance in ("elg", "plg"):
        rows += [(f"{guidance.upper()} omega={w:g}", {"omega": w, "language.guidance": guidance}) for w in omegas]
    for t in sharpen:
        sharp = {"language.guidance": "elg", "language.target_temperature": t, "language.same_class": same_class}
        rows += [(f"ELG omega={w:g}, T_lang={t:g}, {same_class}", {**sharp, "omega": w}) for w in omegas]
    return rows


def controls(name: str, overrides: dict[str, object]) -> list[Row]:
    """The shuffled and uniform controls of one guided row: the same overrides, the guidance swapped."""
    return [(f"{c} ({name})", {**overrides, "language.guidance": c}) for c in ("shuffled", "uniform")]


def dive_grid(omegas: list[float], control_omega: float) -> list[Row]:
    """Linear vs DivE head, each without and with ELG; DivE + ELG with cosine vs smooth-Chamfer S_img;
    PLG rank-wise vs as sets; the shuffled control of the guided DivE row (first omega)."""
    w = omegas[0]
    dive = {"model.head": "dive"}
    sc = {**dive, "language.similarity": "smooth_chamfer"}
    return [
        (BASELINE, {"omega": 0.0, "language.guidance": "none"}),
        (f"linear, ELG omega={w:g}", {"omega": w, "language.guidance": "elg"}),
        ("DivE, omega=0", {**dive, "omega": 0.0, "language.guidance": "none"}),
        (f"DivE, ELG omega={w:g}, S_img cosine", {**dive, "omega": w, "language.guidance": "elg"}),
        (f"DivE, ELG omega={w:g}, S_img smooth-Chamfer", {**sc, "omega": w, "language.guidance": "elg"}),
        (f"DivE, PLG rankwise omega={w:g}", {**sc, "omega": w, "language.guidance": "plg"}),
        (
            f"DivE, PLG as sets omega={w:g}",
            {**sc, "omega": w, "language.guidance": "plg", "language.plg_similarity": "smooth_chamfer"},
        ),
        (f"DivE, shuffled omega={control_omega:g}", {**sc, "omega": control_omega, "language.guidance": "shuffled"}),
    ]


def with_overrides(params: dict, overrides: dict[str, object]) -> dict:
    out = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def run_one(params: dict, workdir: Path) -> dict[str, float]:
    """Train and evaluate in ``workdir`` with the precompute outputs linked in; return the metrics."""
    (workdir / "data").mkdir(parents=True)
    for entry in (REPO / "data").iterdir():
        if entry.name not in WRITTEN:
            (workdir / "data" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    langdml = str(Path(sys.executable).parent / "langdml")
    for stage in ("train", "evaluate"):
        res = subprocess.run([langdml, stage], cwd=workdir, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"langdml {stage} failed in {workdir}:\n{res.stderr[-3000:]}")
    return json.loads((workdir / "data/eval/metrics.json").read_text())


def summary(runs: pl.DataFrame) -> pl.DataFrame:
    """Per configuration: mean and std over seeds of each metric, and of its paired same-seed
    difference to the baseline (the std of a difference is what tells an effect from seed noise)."""
    base = runs.filter(pl.col("config") == BASELINE).select("seed", *[pl.col(k).alias(f"{k}_base") for k in KEYS])
    paired = runs.join(base, on="seed", how="left").with_columns(
        [(pl.col(k) - pl.col(f"{k}_base")).alias(f"{k}_diff") for k in KEYS]
    )
    stats = []
    for k in KEYS:
        stats += [pl.col(k).mean().alias(f"{k}_mean"), pl.col(k).std().fill_null(0.0).alias(f"{k}_std")]
        stats += [
            pl.col(f"{k}_diff").mean().alias(f"{k}_dmean"),
            pl.col(f"{k}_diff").std().fill_null(0.0).alias(f"{k}_dstd"),
        ]
    return paired.group_by("config", maintain_order=True).agg(stats)


def pct(mean: float, std: float, signed: bool = False) -> str:
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * std:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--omegas", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--control-omega", type=float, default=None, help="dive grid: omega of its control")
    ap.add_argument("--sharpen", type=float, nargs="*", default=[0.1], help="language grid: T_lang of extra ELG rows")
    ap.add_argument("--same-class", choices=["fill", "exclude"], default="exclude", help="with --sharpen")
    ap.add_argument("--out", type=Path, default=None, help="also write the raw results as JSON here")
    ap.add_argument("--grid", choices=["language", "dive"], default="language", help="which table")
    args = ap.parse_args()
    for name in NEEDED:
        if not (REPO / "data" / name).exists():
            raise SystemExit(f"data/{name} is missing: run `dvc repro` first")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    pretrained = json.loads((REPO / "data/pretrained_eval/metrics.json").read_text())

    results: dict[str, list[dict[str, float]]] = {}
    rows: list[dict[str, object]] = []
    scratch = Path(tempfile.mkdtemp(prefix="langdml-seeds-"))

    def run_rows(configs: list[Row]) -> None:
        for name, overrides in configs:
            for seed in args.seeds:
                t0 = time.perf_counter()
                params = with_overrides(base, {**overrides, "seed": seed})
                metrics = run_one(params, scratch / f"{len(rows)}-s{seed}")
                results.setdefault(name, []).append(metrics)
                rows.append({"config": name, "seed": seed, **{k: metrics[k] for k in KEYS}})
                print(
                    f"{name:40s} seed={seed} recall@1={metrics['recall@1']:.4f} "
                    f"map@r={metrics['map@r']:.4f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    try:
        if args.grid == "dive":
            control_omega = args.control_omega if args.control_omega is not None else max(args.omegas)
            run_rows(dive_grid(args.omegas, control_omega))
        else:
            guided = grid(args.omegas, args.sharpen, args.same_class)
            run_rows(guided)
            means = (
                pl.DataFrame(rows).filter(pl.col("config") != BASELINE).group_by("config").agg(pl.col(KEYS[0]).mean())
            )
            best = means.sort(KEYS[0], descending=True)["config"][0]
            print(f"controls at the best guided row: {best}", flush=True)
            run_rows(controls(best, dict(guided)[best]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n(mean ± std over seeds {args.seeds}; Δ: paired same-seed difference to the baseline)")
    print("| configuration | recall@1 (%) | MAP@R (%) | Δ recall@1 | Δ MAP@R |")
    print("|---|---|---|---|---|")
    control = " | ".join(f"{100 * pretrained[k]:.1f}" for k in KEYS)
    print(f"| pretrained backbone, no training | {control} | | |")
    for r in summary(pl.DataFrame(rows)).iter_rows(named=True):
        cells = [pct(r[f"{k}_mean"], r[f"{k}_std"]) for k in KEYS]
        cells += [pct(r[f"{k}_dmean"], r[f"{k}_dstd"], signed=True) for k in KEYS]
        print(f"| {r['config']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"pretrained": pretrained, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
