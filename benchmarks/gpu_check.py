"""The prepared GPU check (``bash benchmarks/gpu_check.sh``): one JSON of everything a lent GPU should tell us.

Sections, each ``{"skipped": why}`` or ``{"failed": the error's last line}`` when it cannot run:

- ``environment``: Python, torch, the devices, and which packages import here (a device machine may lack
  some: nothing is installed, the sections that need a missing one skip and say which);
- ``tests``: ``pytest tests/test_gpu.py`` (its tests skip themselves without CUDA or faiss-gpu);
- ``model_only``: training images/s of each DML recipe's model (ResNet50 at 224, the recipe's batch and
  precision; random weights), a fixed batch already on the device: the ceiling the stage is compared with;
- ``full_stage``: ``benchmarks/paper_scale.py`` on one CUB200 recipe and DivE's COCO recipe (the stages under
  ``dvc repro``: decode, augmentation, loader, step; the per-epoch evaluation; DivE at batch 200 x 5 captions);
- ``evaluation``: leave-one-out retrieval at 1M x 512 (the certified low-precision k-NN in torch and, where
  faiss-gpu is installed, faiss' flat index);
- ``ddp``: ``benchmarks/ddp_scaling.py`` when two or more GPUs are present.

Without CUDA it measures what a CPU can in a minute (model-only at batch 4, evaluation at 20k x 512, the tests)
and marks the GPU sections skipped, so the script itself is tested (tests/test_gpu_check.py). ``--quick``
shrinks the CPU sizes further (the test).

    bash benchmarks/gpu_check.sh gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGES = ["torch", "torchvision", "timm", "open_clip", "transformers", "faiss", "numba", "polars", "pyarrow"]
PACKAGES += ["dvc", "pytest", "scipy", "nltk"]
DML_RECIPE, DIVE_RECIPE = "roth22/cub200-rn512-ms-plg", "dive/coco-butd-bigru"


def section(name: str, fn: Callable[[], dict[str, Any]], out: dict[str, Any]) -> None:
    """Run one section; its failure is one line in the JSON, never the end of the check."""
    started = time.perf_counter()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    try:
        out[name] = fn()
    except Exception as err:  # a section's crash is a finding to report, not a reason to stop
        out[name] = {"failed": f"{type(err).__name__}: {str(err).strip().splitlines()[-1:] or ['']}"}
    out[name]["seconds"] = round(time.perf_counter() - started, 1)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def environment() -> dict[str, Any]:
    import torch

    found = {p: importlib.util.find_spec(p) is not None for p in PACKAGES}
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "importable": found,
    }
    if found["faiss"]:
        import faiss

        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return env


def tests() -> dict[str, Any]:
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed here"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_gpu.py"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"exit": done.returncode, "summary": lines[-1] if lines else "", "tail": lines[-12:]}


def train_rate(backbone: str, batch: int, amp: bool, steps: int, device: Any) -> dict[str, float]:
    """Images/s of forward + backward + Adam on one fixed batch already on ``device``."""
    import timm
    import torch

    model = timm.create_model(backbone, pretrained=False, num_classes=512).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, 224, 224, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: cuDNN's algorithm search, allocations
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"images_per_s": batch / seconds, "batch_measured": batch, "step_s": seconds}


def model_only(quick: bool) -> dict[str, Any]:
    """Each distinct (backbone, batch, AMP) among the DML recipes at 224 px (their linear head's 512 outputs),
    random weights: the model-only ceiling the full stage is compared with."""
    import torch

    from stages.core.recipe import load_recipe, recipe_names

    device = torch.device("cuda" if cuda() else "cpu")
    shapes = set()
    for name in recipe_names():
        p = load_recipe(name).params
        if "train.batch_size" in p:
            shapes.add((p["model.backbone"].removeprefix("timm:"), p["train.batch_size"], bool(p.get("train.amp"))))
    results: dict[str, Any] = {}
    for backbone, batch, amp in sorted(shapes)[:1] if quick else sorted(shapes):
        b, steps = (batch, 20) if device.type == "cuda" else ((2, 1) if quick else (4, 2))
        results[f"{backbone} batch {batch} {'amp' if amp else 'fp32/tf32'}"] = train_rate(
            backbone, b, amp, steps, device
        )
    if device.type == "cpu":
        results["note"] = "CPU: batch 4 (2 and the first shape only with --quick), a lower bound of the batch rate"
    return results


def full_stage() -> dict[str, Any]:
    if not cuda():
        return {"skipped": "no CUDA device: `python benchmarks/paper_scale.py --recipe NAME` measures the stages here"}
    out: dict[str, Any] = {}
    for recipe, extra in ((DML_RECIPE, ["--fraction", "0.3", "--steps", "30"]), (DIVE_RECIPE, ["--steps", "10"])):
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "out.json"
            cmd = [sys.executable, str(REPO / "benchmarks/paper_scale.py"), "--recipe", recipe, "--device", "cuda"]
            cmd += extra
            cmd += ["--json", str(result), "--workers", str(min(8, os.cpu_count() or 1))]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            out[recipe] = json.loads(result.read_text())[0] if result.is_file() else {"failed": done.stderr[-500:]}
    return out


def evaluation(quick: bool) -> dict[str, Any]:
    """Leave-one-out retrieval at 1M x 512 on a GPU: ``retrieval_metrics`` (the evaluate stage's call; the GPU
    index with faiss-gpu) and the certified low-precision k-NN (:mod:`stages.core.evaluation.lowp`) in each
    precision the device multiplies faster; on a CPU the same at 20k (5k with ``--quick``)."""
    import numpy as np

    from stages.core.evaluation import lowp
    from stages.core.evaluation.metrics import retrieval_metrics

    gpu = cuda()
    n = 1_000_000 if gpu else (5_000 if quick else 20_000)
    device = "cuda" if gpu else "cpu"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 50, 512), dtype=np.float32)
    labels = np.arange(n) % len(centres)
    x = centres[labels] + 2.5 * rng.standard_normal((n, 512), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict[str, Any] = {"n": n, "dim": 512, "device": device}
    faiss_gpus = 0
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss_gpus = getattr(faiss, "get_num_gpus", lambda: 0)()
    if gpu and not faiss_gpus:
        out["retrieval_metrics"] = "skipped: faiss-gpu is not installed here (1M on faiss-cpu takes hours)"
    else:
        start = time.perf_counter()
        metrics = retrieval_metrics(x, query_labels=labels, nmi=False)
        out["retrieval_metrics_s"] = time.perf_counter() - start
        out["recall@1"], out["map@r"] = metrics["recall@1"], metrics["map@r"]
    precision = lowp.choose_precision(device, 512)
    out["precision_chosen"] = precision
    for name in sorted(({precision, "fp16"} if gpu else {precision}) & set(lowp.LOW_DTYPES)):
        start = time.perf_counter()
        _, _, fallbacks = lowp.certified_topk(x, x, 50, name, device=device)
        out[f"certified_{name}_s"], out[f"certified_{name}_fallbacks"] = time.perf_counter() - start, fallbacks
    if not gpu:
        out["note"] = "CPU: 20k rows (5k with --quick) instead of 1M; the GPU figures are what this section is for"
    return out


def ddp() -> dict[str, Any]:
    import torch

    if torch.cuda.device_count() < 2:
        count = torch.cuda.device_count()
        return {"skipped": f"{count} CUDA device(s): DDP needs 2 (gloo on CPU: tests/test_distributed.py)"}
    cmd = [sys.executable, str(REPO / "benchmarks/ddp_scaling.py")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    return {"exit": done.returncode, "tail": (done.stdout + done.stderr).strip().splitlines()[-12:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--quick", action="store_true", help="the smallest CPU sizes (tests/test_gpu_check.py)")
    args = ap.parse_args()
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}
    section("environment", environment, out)
    section("tests", tests, out)
    section("model_only", lambda: model_only(args.quick), out)
    section("full_stage", full_stage, out)
    section("evaluation", lambda: evaluation(args.quick), out)
    section("ddp", ddp, out)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(out, indent=1, default=str))
    tmp.replace(args.out)
    print(f"gpu_check: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
