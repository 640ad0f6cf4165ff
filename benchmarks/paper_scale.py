"""Paper-scale dry runs: each recipe at its full model, batch and augmentation, on synthetic data in its dataset's
real on-disk layout, through the stages' own code, on this machine.

For each recipe it writes the dataset (CUB_200_2011 with images.txt / classes.txt / JPEGs of the real sizes;
CARS196's cars_annos.mat + car_ims/; SOP's Ebay_{train,test}.txt + class folders; COCO / Flickr30K precomp
``{train,testall}_ims.npy`` of N x 36 x 2048 float32 + 5 captions per image) into a scratch DVC project holding
this working tree's pipeline (benchmarks/dvc_scratch.py), applies the recipe to its params.yaml as ``langdml
recipe`` does, and runs ``dvc repro train`` (DML: fetch_data, prepare, embed_text, pseudo_labels, cache_images,
train) or ``dvc repro imagetext_evaluate`` (image-text: imagetext_prepare, _features, _train, _evaluate), each
stage in its own process as DVC starts it, training cut to ``--steps`` steps of one epoch
(``train.max_steps_per_epoch``), with the recipe's per-epoch test evaluation after it.

The images are a stated fraction of the real dataset (``--fraction``, default ``FRACTIONS``: of each class's
images for CUB200 and CARS196, every class kept; of the classes for SOP, 5 images a class as the real ~5.3; of the
training images for the precomp sets, whose test split is written whole: 5,000 x 36 x 2048 for COCO's 5 folds).
Weights: no model hub is reachable here, so each hub model is built with random weights of its architecture (the
same compute); the GloVe 840B-300d file of the DivE recipes is written for the synthetic vocabulary, 300-d.

Reported per recipe: each stage's seconds from its process's start (imports included) and peak RSS (the process's
``ru_maxrss``), recorded by the probe in the stage processes (benchmarks/probe/sitecustomize.py), the training step's
steady-state time (mean after the first step), the per-epoch evaluation's seconds, the data loader's images/s on
one core (decode + the recipe's train transform, what one DataLoader worker does), the caches on disk (measured
and scaled to the full dataset), and a projection of the full run on one GPU: from the GPU rate measured by
``benchmarks/gpu_check.sh`` when given (``--gpu-train-rate``), else from NVIDIA's published ResNet50 v1.5 PyTorch
rates on one A100 80GB (TF32 938 img/s training, DeepLearningExamples README, pytorch-21.03; inference taken as 3x
training): an upper bound for an H100, which is faster. Image-text recipes are projected by the CPU/GPU ratio of
the DML recipes' ResNet50 (said so in the table; a GRU's ratio differs).

    .venv/bin/python benchmarks/paper_scale.py --recipe roth22/cub200-rn512-ms-plg --steps 3
    .venv/bin/python benchmarks/paper_scale.py --all --steps 2 --json paper_scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dvc_scratch import new_project, repro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md (pytorch-21.03 container):
# one A100 80GB, ResNet50 v1.5 training at 224 px. Inference is taken as 3x the training rate (forward only).
A100_RESNET50_TRAIN = {"tf32": 938.0, "amp": 2470.0}
INFERENCE_OVER_TRAINING = 3.0


@dataclass(frozen=True)
class ImageLayout:
    """A DML dataset's real size: classes (train / test by the protocol), images per class, photo size."""

    classes: int
    train_classes: int
    per_class: float  # the real mean
    size: tuple[int, int]  # a typical photo, width x height


IMAGE_SETS = {
    "cub200": ImageLayout(200, 100, 11788 / 200, (500, 375)),
    "cars196": ImageLayout(196, 98, 16185 / 196, (700, 480)),
    "sop": ImageLayout(22634, 11318, 120053 / 22634, (500, 500)),
}
# The default fraction per dataset: two images a class for CUB200 and CARS196 (the least a class-balanced batch
# draws), 1% of SOP's classes, 2% / 10% of the precomp training images (their test splits are written whole).
FRACTIONS = {"cub200": 0.034, "cars196": 0.025, "sop": 0.01, "coco": 0.02, "f30k": 0.1}
# train images, test images, the test split's file stem, regions x channels
PRECOMP_SETS = {"coco": (113287, 5000, "testall"), "f30k": (29000, 1000, "test")}
REGIONS, CHANNELS, CAPTIONS_PER_IMAGE = 36, 2048, 5
SOP_SUPER = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa", "stapler"]
SOP_SUPER += ["table", "toaster"]


# --- synthetic datasets in the real layouts ----------------------------------------------------------------


def photo(path: Path, size: tuple[int, int], rng: np.random.Generator) -> None:
    """A JPEG of about ``size`` (+-10%): upsampled colour blobs plus pixel noise, ~87 KB at 500 x 375 (CUB's
    1.1 GB archive holds ~95 KB an image), so it decodes at a photo's cost."""
    from PIL import Image

    w, h = (int(s * rng.uniform(0.9, 1.1)) for s in size)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    pixels = np.clip(base + rng.normal(0.0, 14.0, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def write_cub(root: Path, per_class: int, rng: np.random.Generator) -> int:
    layout = IMAGE_SETS["cub200"]
    images, labels, classes = [], [], []
    image_id = 0
    for cid in range(1, layout.classes + 1):
        folder = f"{cid:03d}.Synthetic_Bird_{cid}"
        classes.append(f"{cid} {folder}")
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/Synthetic_Bird_{cid}_{k:04d}.jpg"
            photo(root / "images" / rel, layout.size, rng)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes)):
        (root / name).write_text("\n".join(lines) + "\n")
    return image_id


def write_cars(root: Path, per_class: int, rng: np.random.Generator) -> int:
    import scipy.io

    layout = IMAGE_SETS["cars196"]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = layout.classes * per_class
    annos = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    for i in range(n):
        cid = i % layout.classes + 1
        rel = f"car_ims/{i + 1:06d}.jpg"
        photo(root / rel, layout.size, rng)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 600, 400)]
        annos[0, i] = (rel, *box, np.array([[cid]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    names = np.empty((1, layout.classes), dtype=object)
    names[0, :] = [f"Synthetic Make{c:03d} Sedan 2012" for c in range(1, layout.classes + 1)]
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    return n


def write_sop(root: Path, fraction: float, rng: np.random.Generator) -> int:
    layout = IMAGE_SETS["sop"]
    per_class = round(layout.per_class)
    image_id = 0
    for split, n_classes, first in (
        ("train", layout.train_classes, 1),
        ("test", layout.classes - layout.train_classes, layout.train_classes + 1),
    ):
        lines = ["image_id class_id super_class_id path"]
        for cid in range(first, first + max(2, round(n_classes * fraction))):
            sid = cid % len(SOP_SUPER)
            for k in range(per_class):
                image_id += 1
                rel = f"{SOP_SUPER[sid]}_final/{cid:06d}_{k}.JPG"
                photo(root / rel, layout.size, rng)
                lines.append(f"{image_id} {cid} {sid + 1} {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return image_id


def write_precomp(root: Path, name: str, fraction: float, rng: np.random.Generator) -> tuple[int, list[str]]:
    """``{train,test*}_ims.npy`` (N x 36 x 2048 float32, written in chunks) and ``_caps.txt`` (5 a picture, 8-14
    words from a Zipf-like vocabulary of 10,000 words, as COCO's ~10.5 on average); the vocabulary."""
    from numpy.lib.format import open_memmap

    n_train, n_test, test_stem = PRECOMP_SETS[name]
    vocab = [f"w{i:05d}" for i in range(10_000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for stem, n in (("train", max(CAPTIONS_PER_IMAGE, round(n_train * fraction))), (test_stem, n_test)):
        ims = open_memmap(root / f"{stem}_ims.npy", mode="w+", dtype=np.float32, shape=(n, REGIONS, CHANNELS))
        for start in range(0, n, 500):
            stop = min(n, start + 500)
            ims[start:stop] = rng.random((stop - start, REGIONS, CHANNELS), dtype=np.float32)
        ims.flush()
        del ims
        lengths = rng.integers(8, 15, n * CAPTIONS_PER_IMAGE)
        words = rng.choice(len(vocab), size=int(lengths.sum()), p=weights)
        lines, at = [], 0
        for length in lengths:
            lines.append(" ".join(vocab[w] for w in words[at : at + length]))
            at += length
        (root / f"{stem}_caps.txt").write_text("\n".join(lines) + "\n")
        total += n
    return total, vocab


def write_glove(path: Path, vocab: list[str], dim: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = rng.standard_normal((len(vocab), dim)).astype(np.float32)
    with path.open("w") as f:
        for word, vec in zip(vocab, vectors, strict=True):
            f.write(word + " " + " ".join(f"{v:.4f}" for v in vec) + "\n")


# --- the stages, through DVC ---------------------------------------------------------------------------------


def run_pipeline(project: Path, target: str, log: Path) -> tuple[dict[str, Any], float]:
    """``dvc repro TARGET`` in the scratch project, hub models at random weights (benchmarks/probe): each stage's
    record by its module name (seconds, peak MB, epoch rows), or ``failed`` for the stage DVC stopped at; the
    repro's wall seconds."""
    started = time.perf_counter()
    status, printed, records = repro(project, [target], env={"LANGDML_PROBE_RANDOM_WEIGHTS": "1"})
    wall = time.perf_counter() - started
    with log.open("a") as f:
        f.write(printed)
    out: dict[str, Any] = {}
    for record in records:
        if record["rank"] == 0:
            out[record["command"].replace("-", "_")] = record
    if status:
        ran = re.findall(r"Running stage '([^']+)'", printed) or ["?"]
        lines = [line for line in printed.strip().splitlines() if line.strip()]
        out[ran[-1]] = {"failed": f"exit {status}: {(lines or ['?'])[-1][-300:]}"}
    return out, wall


# --- one recipe --------------------------------------------------------------------------------------------


def folder_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def loader_rates(workdir: Path, seconds: float = 8.0) -> dict[str, float]:
    """Images/s on one core (one DataLoader worker's work): ``decode`` (the JPEG to RGB, what the image cache
    saves) and ``decode_augment`` (plus the recipe's train transform: RandomResizedCrop, flip, to tensor,
    normalise)."""
    import torch

    torch.set_num_threads(1)
    os.chdir(workdir)
    from stages import paths
    from stages.core.artifacts import load_manifest
    from stages.core.config import load_params
    from stages.core.data.torch_dataset import ImageDataset
    from stages.core.data.transforms import train_transform

    params = load_params("params.yaml")
    table, root = load_manifest(paths.TRAIN_MANIFEST)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rates = {}
    for name, transform in (
        ("decode", None),
        ("decode_augment", train_transform(params.model.image_size, mean, std, params.train.augment)),
    ):
        dataset = ImageDataset(table, root, transform)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            dataset[n % len(dataset)]
            n += 1
        rates[name] = n / (time.perf_counter() - start)
    return rates


def dml_recipe(name: str, args: argparse.Namespace, workdir: Path, log: Path) -> dict[str, Any]:
    from stages.core.recipe import apply_recipe, load_recipe

    recipe = load_recipe(name)
    dataset = recipe.params["dataset.name"]
    layout = IMAGE_SETS[dataset]
    rng = np.random.default_rng(0)
    new_project(workdir)
    root = workdir / "data/raw" / dataset
    started = time.perf_counter()
    fraction = args.fraction or FRACTIONS[dataset]
    if dataset == "cub200":
        per_class = max(2, round(layout.per_class * fraction))
        images = write_cub(root, per_class, rng)
    elif dataset == "cars196":
        per_class = max(2, round(layout.per_class * fraction))
        images = write_cars(root, per_class, rng)
    else:
        images = write_sop(root, fraction, rng)
    written = time.perf_counter() - started
    scale = (layout.classes * layout.per_class) / images  # real images over written ones
    overrides = {
        "dataset.root": f"data/raw/{dataset}",
        "model.pretrained": False,
        "train.epochs": 1,
        "train.max_steps_per_epoch": args.steps,
        "train.num_workers": args.workers,
        "train.device": args.device,
        "pseudo_labels.device": args.device,
        "pseudo_labels.num_workers": args.workers,
        "text.device": args.device,
        "evaluate.device": args.device,
        "evaluate.num_workers": args.workers,
    }
    apply_recipe(workdir / "params.yaml", name, overrides)
    out: dict[str, Any] = {"recipe": name, "dataset": dataset, "images": images, "scale": scale, "write_s": written}
    stages, out["dvc_s"] = run_pipeline(workdir, "train", log)
    out.update(stages)
    if any("failed" in v for v in stages.values()):
        return out
    rates = loader_rates(workdir)
    out["loader_img_s_per_core"], out["decode_img_s_per_core"] = rates["decode_augment"], rates["decode"]
    os.chdir(REPO)
    # (measured MB, MB at the full dataset): manifests grow with the images, the class caches with the classes
    # (all written, but for SOP: a fraction of them), the model with neither
    grows = {"prepared": scale, "language": scale if dataset == "sop" else 1.0, "model": 1.0}
    grows["pseudolabels"] = grows["language"]
    out["caches_mb"] = {folder: (folder_mb(workdir / "data" / folder), grows[folder]) for folder in grows}
    out["image_mb"] = folder_mb(root) / images
    row = out["train"]["rows"][-1]
    out["step_s"], out["evaluate_s"] = row["step_s"], row.get("evaluate_s", 0.0)
    return out


def imagetext_recipe(name: str, args: argparse.Namespace, workdir: Path, log: Path) -> dict[str, Any]:
    from stages.core.recipe import apply_recipe, load_recipe

    recipe = load_recipe(name)
    folder = recipe.params["imagetext.data.root"]
    dataset = "coco" if "coco" in folder else "f30k"
    rng = np.random.default_rng(0)
    new_project(workdir)
    started = time.perf_counter()
    images, vocab = write_precomp(workdir / folder, dataset, args.fraction or FRACTIONS[dataset], rng)
    tower = recipe.params["imagetext.features.text_tower"]
    if tower.startswith("bigru:file:"):
        write_glove(workdir / tower.removeprefix("bigru:file:"), vocab, 300, rng)
    written = time.perf_counter() - started
    n_train, n_test, _ = PRECOMP_SETS[dataset]
    overrides = {
        "imagetext.train.epochs": 1,
        "imagetext.train.max_steps_per_epoch": args.steps,
        "imagetext.train.device": args.device,
    }
    apply_recipe(workdir / "params.yaml", name, overrides)
    out: dict[str, Any] = {"recipe": name, "dataset": dataset, "images": images, "write_s": written}
    out["scale"] = (n_train + n_test) / images
    stages, out["dvc_s"] = run_pipeline(workdir, "imagetext_evaluate", log)
    out.update(stages)
    if any("failed" in v for v in stages.values()):
        return out
    out["caches_mb"] = {
        f: (folder_mb(workdir / "data/imagetext" / f), 1.0 if f == "model" else out["scale"])
        for f in ("prepared", "features", "model")
    }
    out["step_s"] = out["imagetext_train"]["rows"][-1]["step_s"]
    out["evaluate_s"] = out["imagetext_evaluate"]["seconds"]
    return out


# --- projection and table ----------------------------------------------------------------------------------


def projection(result: dict[str, Any], args: argparse.Namespace, cpu_over_gpu: float | None) -> dict[str, Any]:
    """Hours of the full run on one GPU: epochs x (training images at the GPU's training rate + the per-epoch
    test evaluation at its inference rate), the PLG pass once."""
    from stages.core.recipe import load_recipe

    p = load_recipe(result["recipe"]).params
    if "dataset.name" in p:
        layout = IMAGE_SETS[result["dataset"]]
        train_images = layout.train_classes * layout.per_class
        test_images = (layout.classes - layout.train_classes) * layout.per_class
        rate = args.gpu_train_rate or A100_RESNET50_TRAIN["amp" if p.get("train.amp") else "tf32"]
        epochs = p["train.epochs"]
        every = p.get("train.evaluate_every", 0)
        evaluations = epochs // every if every else 1
        seconds = epochs * train_images / rate + evaluations * test_images / (rate * INFERENCE_OVER_TRAINING)
        if "pseudo_labels" in result:
            seconds += train_images / (rate * INFERENCE_OVER_TRAINING) * (299 / 224) ** 2
        cores = rate / result["loader_img_s_per_core"]  # DataLoader workers that keep the GPU fed
        return {"hours": seconds / 3600, "basis": f"ResNet50 at {rate:.0f} img/s training", "cores": cores}
    if cpu_over_gpu is None:
        return {"hours": None, "basis": "no DML recipe ran to calibrate the CPU/GPU ratio"}
    n_train, _, _ = PRECOMP_SETS[result["dataset"]]
    steps = math.ceil(n_train / p["imagetext.train.batch_size"]) * p["imagetext.train.epochs"]
    seconds = steps * result["step_s"] / cpu_over_gpu
    return {"hours": seconds / 3600, "basis": f"CPU step / {cpu_over_gpu:.0f} (the ResNet50 recipes' CPU/GPU ratio)"}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | images written (x real) | stage s (peak GB) | step s | per-epoch eval s "
        "| decode / +augment img/s/core | cores to feed the GPU | caches MB (full size) | projected GPU hours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stages = [k for k in r if isinstance(r[k], dict) and ("seconds" in r[k] or "failed" in r[k])]
        cells = []
        for s in stages:
            v = r[s]
            cells.append(
                f"{s} FAILED: {v['failed']}" if "failed" in v else f"{s} {v['seconds']:.0f} ({v['peak_mb'] / 1024:.1f})"
            )
        caches = r.get("caches_mb", {})
        scaled = ", ".join(f"{k} {v:.0f} ({v * factor:.0f})" for k, (v, factor) in caches.items())
        proj = r.get("projection", {})
        hours = f"{proj['hours']:.1f} ({proj['basis']})" if proj.get("hours") is not None else proj.get("basis", "")
        loader = "- (cached features)"
        if "loader_img_s_per_core" in r:
            loader = f"{r['decode_img_s_per_core']:.0f} / {r['loader_img_s_per_core']:.0f}"
        cores = f"{proj['cores']:.1f}" if "cores" in proj else "-"
        step = f"{r['step_s']:.1f}" if "step_s" in r else "-"
        ev = f"{r['evaluate_s']:.0f}" if "evaluate_s" in r else "-"
        lines.append(
            f"| {r['recipe']} | {r['images']:,} (1/{r['scale']:.0f}) | {'; '.join(cells)} | {step} | {ev} "
            f"| {loader} | {cores} | {scaled} | {hours} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", default=[], help="a recipe name (repeatable)")
    ap.add_argument("--all", action="store_true", help="every recipe `langdml recipe` lists")
    ap.add_argument("--steps", type=int, default=3, help="training steps (one cut epoch)")
    ap.add_argument("--fraction", type=float, default=None, help="of the real images (default: FRACTIONS)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--gpu-train-rate", type=float, default=None, help="measured ResNet50 training img/s on the GPU")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()

    from stages.core.recipe import recipe_names

    names = recipe_names() if args.all else args.recipe
    unknown = sorted(set(names) - set(recipe_names()))
    if not names or unknown:
        sys.exit(f"paper_scale: name recipes with --recipe (or --all); unknown: {unknown}; known: {recipe_names()}")
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="paper_scale-"))
    results = []
    for name in names:
        workdir = scratch / name.replace("/", "--")
        shutil.rmtree(workdir, ignore_errors=True)
        log = scratch / f"{workdir.name}.log"
        log.unlink(missing_ok=True)
        print(f"{name}: writing the data and running `dvc repro` (log: {log})", file=sys.stderr, flush=True)
        run = imagetext_recipe if name.startswith("dive/") else dml_recipe
        results.append(run(name, args, workdir, log))
        os.chdir(REPO)
    ratios = [
        r["step_s"] / (load_batch(r) / (args.gpu_train_rate or A100_RESNET50_TRAIN["tf32"]))
        for r in results
        if "dataset.name" in _params(r) and "step_s" in r
    ]
    cpu_over_gpu = float(np.median(ratios)) if ratios else None
    for r in results:
        if "step_s" in r:
            r["projection"] = projection(r, args, cpu_over_gpu)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(scratch, ignore_errors=True)


def _params(result: dict[str, Any]) -> dict[str, Any]:
    from stages.core.recipe import load_recipe

    return load_recipe(result["recipe"]).params


def load_batch(result: dict[str, Any]) -> int:
    return int(_params(result)["train.batch_size"])


if __name__ == "__main__":
    main()
