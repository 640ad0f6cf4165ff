"""Training: sampler, seeding, smoke run, resume/re-export, fingerprints, NaN stop, SIGKILL resume."""

from __future__ import annotations

import io
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from fixtures_training import (
    CLASS_IDS,
    CLASS_NAMES,
    TinyImages,
    tiny_params,
    train_paths,
    write_class_embeddings,
)
from guards import communicate
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from stages.core.data.sampling import ClassBalancedBatchSampler, SeededSamples
from stages.core.data.train_images import DecodedImages
from stages.core.dml import objective as dml
from stages.core.dml.losses import DMLLoss
from stages.core.dml.objective import train_dml
from stages.core.errors import LangdmlError
from stages.core.model.encoder import load_model
from stages.core.training import checkpoint, fit

torch.set_num_threads(1)
TESTS = Path(__file__).parent


IMAGES = DecodedImages(TinyImages)


def run_fit(root: Path, **overrides):
    paths = train_paths(root)
    if not paths.class_embeddings.exists():
        write_class_embeddings(paths.class_embeddings)
    return train_dml(tiny_params(**overrides), IMAGES, paths, class_names=CLASS_NAMES), paths


# --- sampler and per-item seeding ---------------------------------------------------------------


def test_class_balanced_batches_are_seeded_by_seed_and_epoch() -> None:
    labels = np.repeat([3, 5, 7, 9, 11], [4, 6, 1, 5, 5])
    sampler = ClassBalancedBatchSampler(labels, m=2, batch_size=6, num_batches=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        idx = [i for i, _ in batch]
        classes, counts = np.unique(labels[idx], return_counts=True)
        assert len(classes) == 3 and (counts == 2).all()  # 3 distinct classes x m=2 (class 7 has 1 image)
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    with pytest.raises(LangdmlError, match="3 classes per batch, but the training split has only 2"):
        ClassBalancedBatchSampler(np.array([0, 0, 1, 1]), m=2, batch_size=6, num_batches=1, seed=0)


def test_seeded_samples_reproduce_augmentations_densify_labels_and_spare_global_rng() -> None:
    base = TinyImages(T.Compose([T.RandomResizedCrop(8), T.ToTensor()]))
    ds = SeededSamples(base, np.array(CLASS_IDS))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    (a, la), (b, _), (c, _) = ds[(7, 42)], ds[(7, 42)], ds[(7, 43)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert la == CLASS_IDS.index(int(base.labels[7]))


def test_rng_state_round_trip() -> None:
    import random

    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# --- fit -------------------------------------------------------------------------------------------


def test_smoke_two_epochs_loss_falls_outputs_written_and_model_round_trips(tmp_path: Path) -> None:
    result, paths = run_fit(tmp_path)
    assert result.epochs_trained == 2 and result.resumed_from == 0
    first, last = result.history
    assert last["loss/total"] < first["loss/total"]
    assert first["loss/language"] > 0 and first["images_per_s"] > 0
    assert paths.checkpoint.is_file()
    ckpt = torch.load(paths.checkpoint, weights_only=True)
    assert ckpt["epoch"] == 2
    model, mp = load_model(paths.model_dir)
    assert mp.backbone == "timm:test_resnet"
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["objective"][f"model.{name}"]), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = model(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    for part in ("dml", "language", "total"):
        rows = (paths.log_dir / "plots" / "metrics" / "loss" / f"{part}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{part}" and len(rows) == 3
    assert not (paths.log_dir / "plots" / "metrics" / "images_per_s.tsv").exists()  # timings are not metrics
    assert not (paths.log_dir / "dvc.yaml").exists()


def test_a_dry_run_cut_stops_each_epoch_after_its_steps_and_logs_the_step_time(tmp_path: Path, caplog) -> None:
    """``train.max_steps_per_epoch`` (benchmarks/paper_scale.py): 2 of the 3 batches per epoch, so Adam has taken
    4 steps after 2 epochs; the epoch's log record carries its row (timings included) for a tool that times it.
    The cut is part of the fingerprint: a cut run's checkpoint is never resumed by a whole run."""
    import logging

    caplog.set_level(logging.INFO, logger="stages.core.training.fit")
    result, _ = run_fit(tmp_path, train={"max_steps_per_epoch": 2})
    steps = {int(s["step"]) for s in result.optimizer.state_dict()["state"].values()}
    assert steps == {4}
    rows = [r.row for r in caplog.records if hasattr(r, "row")]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    whole, _ = run_fit(tmp_path)
    assert whole.resumed_from == 0


def test_rerun_with_same_config_reexports_and_new_config_starts_fresh(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stages.core")
    _, paths = run_fit(tmp_path)
    weights = load_file(paths.model_dir / "model.safetensors")
    (paths.model_dir / "model.safetensors").unlink()

    again, _ = run_fit(tmp_path, train={"num_workers": 0, "log_every": 1})  # neither affects the weights
    assert again.epochs_trained == 0 and again.resumed_from == 2
    rexp = load_file(paths.model_dir / "model.safetensors")
    assert all(torch.equal(weights[k], rexp[k]) for k in weights)
    rows = (paths.log_dir / "plots" / "metrics" / "loss" / "total.tsv").read_text().splitlines()
    assert len(rows) == 3  # the history is replayed into fresh logs

    more, _ = run_fit(tmp_path, train={"epochs": 3})  # no schedule depends on epochs: continue
    assert more.resumed_from == 2 and more.epochs_trained == 1

    caplog.clear()
    fresh, _ = run_fit(tmp_path, omega=2.0)
    assert fresh.resumed_from == 0 and fresh.epochs_trained == 2
    assert any("different training config (omega)" in r.getMessage() for r in caplog.records)


def test_changed_input_file_starts_fresh(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stages.core")
    run_fit(tmp_path, train={"epochs": 1})
    write_class_embeddings(train_paths(tmp_path).class_embeddings, seed=9)
    fresh, _ = run_fit(tmp_path, train={"epochs": 1})
    assert fresh.resumed_from == 0
    assert any("different training config (inputs)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("part", "target"), [("language", "language_matching"), ("dml", "dml")])
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str, target: str
) -> None:
    run_fit(tmp_path, train={"epochs": 1})
    paths = train_paths(tmp_path)
    good = paths.checkpoint.read_bytes()
    calls = {"n": 0}

    def poison(loss: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 2 else loss  # resumed at epoch 2: its step 2

    if target == "dml":
        real_forward = DMLLoss.forward
        monkeypatch.setattr(DMLLoss, "forward", lambda self, e, y: poison(real_forward(self, e, y)))
    else:
        real = dml.language_matching
        monkeypatch.setattr(dml, "language_matching", lambda *a, **k: poison(real(*a, **k)))
    with pytest.raises(LangdmlError) as err:
        train_dml(tiny_params(train={"epochs": 3}), IMAGES, paths, class_names=CLASS_NAMES)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"non-finite {part} loss at epoch 2/3, step 2" in msg
    assert paths.checkpoint.read_bytes() == good


def test_missing_cache_and_too_few_classes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `langdml pseudo-labels`"):
        train_dml(tiny_params(language={"guidance": "plg"}), IMAGES, train_paths(tmp_path))
    with pytest.raises(LangdmlError, match="only 4 classes"):
        train_dml(tiny_params(train={"batch_size": 10, "samples_per_class": 2}), IMAGES, train_paths(tmp_path))
    result = train_dml(tiny_params(omega=0.0, train={"epochs": 1}), IMAGES, train_paths(tmp_path))  # no cache needed
    assert result.history[0]["loss/language"] == 0.0


@pytest.mark.parametrize("loss", ["proxy_anchor", "margin"])
def test_losses_with_parameters_train_and_resume(tmp_path: Path, loss: str) -> None:
    _, paths = run_fit(tmp_path, train={"epochs": 1, "loss": loss, "scheduler": "multistep", "milestones": [1]})
    ckpt = torch.load(paths.checkpoint, weights_only=True)
    assert any(k.startswith("dml.") for k in ckpt["objective"]) and ckpt["scheduler"]["last_epoch"] == 1
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["backbone", "head", "loss"]
    more, _ = run_fit(tmp_path, train={"epochs": 2, "loss": loss, "scheduler": "multistep", "milestones": [1]})
    assert more.resumed_from == 1 and more.history[1]["lr/backbone"] == pytest.approx(1e-3 * 0.3)


# --- the stage, through the real manifest reader ----------------------------------------------------


def test_train_stage_on_a_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from stages import paths
    from stages.cli import app
    from stages.core.artifacts import MANIFEST_SCHEMA
    from stages.core.tables import write_parquet

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    blobs, labels = [], []
    for c in CLASS_IDS:
        for _ in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), "L").save(buf, "PNG")
            blobs.append(buf.getvalue())
            labels.append(c)
    table = pa.table(
        {
            "path": pa.nulls(len(labels), pa.string()),
            "image_bytes": blobs,
            "label": pa.array(labels, pa.int64()),
            "class_name": [CLASS_NAMES[c] for c in labels],
            "super_class": pa.nulls(len(labels), pa.string()),
        }
    )
    write_parquet(paths.TRAIN_MANIFEST, table, MANIFEST_SCHEMA, {"dataset": "test", "root": str(tmp_path)})
    raw = tiny_params(train={"epochs": 1}).model_dump()
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    missing = runner.invoke(app, ["train"])
    assert missing.exit_code == 1
    assert "run `langdml embed-text`" in missing.output and len(missing.output.strip().splitlines()) == 1
    write_class_embeddings(paths.CLASS_EMBEDDINGS)
    ok = runner.invoke(app, ["train"])
    assert ok.exit_code == 0, ok.output
    assert paths.MODEL_WEIGHTS.is_file() and paths.MODEL_CONFIG.is_file() and paths.CHECKPOINT_FILE.is_file()


# --- kill -9 mid-epoch, re-run, same weights as never interrupted ----------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from fixtures_training import CLASS_NAMES, TinyImages, tiny_params, train_paths, write_class_embeddings
    from stages.core.dml import objective as dml
    from stages.core.data.train_images import DecodedImages

    root, kill_at, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    calls = 0
    real = dml.language_matching

    def maybe_kill(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    dml.language_matching = maybe_kill
    paths = train_paths(root)
    if not paths.class_embeddings.exists():
        write_class_embeddings(paths.class_embeddings)
    params = tiny_params(train={{"epochs": 3, "deterministic": True, "num_workers": workers, "loss": "margin"}})
    result = dml.train_dml(params, DecodedImages(TinyImages), paths, class_names=CLASS_NAMES)
    print("resumed_from", result.resumed_from)
    """
)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_bit_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(root: Path, kill_at: int, workers: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(root), str(kill_at), str(workers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    # Uninterrupted (in-process loading) and killed at epoch 2, step 2 (with a worker process), in parallel.
    clean, killed = start(tmp_path / "clean", -1, 0), start(tmp_path / "killed", 5, 1)
    out_clean, err_clean = communicate(clean, "the uninterrupted run")
    _, err_killed = communicate(killed, "the run killed at epoch 2")
    assert clean.returncode == 0, err_clean[-2000:]
    assert killed.returncode == -9, err_killed[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "checkpoint" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert not (tmp_path / "killed" / "model").exists()

    rerun = start(tmp_path / "killed", -1, 1)
    out, err = communicate(rerun, "the resumed run")
    assert rerun.returncode == 0, err[-2000:]
    assert "resumed_from 1" in out and "resumed_from 0" in out_clean
    a = load_file(tmp_path / "clean" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = torch.load(tmp_path / "clean" / "checkpoint" / "last.pt", weights_only=True)
    lb = torch.load(tmp_path / "killed" / "checkpoint" / "last.pt", weights_only=True)
    betas = [k for k in la["objective"] if k.startswith("dml.")]
    assert betas and all(torch.equal(la["objective"][k], lb["objective"][k]) for k in betas)  # margin's betas
    losses = [
        [{k: v for k, v in r.items() if k.startswith("loss/")} for r in h] for h in (la["history"], lb["history"])
    ]
    assert losses[0] == losses[1]


# --- seeding only the CPU generator; named loss terms ------------------------------------------------


def test_per_item_seeding_leaves_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.manual_seed`` also reseeds every CUDA generator, which ``fork_rng(devices=[])`` does not
    restore: on a GPU each item would reset the CUDA RNG (dropout, ...) to its augmentation seed."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    ds = SeededSamples(TinyImages(T.Compose([T.RandomResizedCrop(8), T.ToTensor()])), np.array(CLASS_IDS))
    ds[(3, 11)]
    assert reseeded == []


def test_step_meter_and_logs_follow_whatever_terms_the_objective_returns(tmp_path: Path) -> None:
    """A new loss term is one more dict entry: the step sums it with its weight, the meter averages it,
    the log row names it and the non-finite stop reports it, with no change to any of them."""

    class WithExtra(dml.DMLObjective):
        def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            terms = super().forward(images, labels)
            return {**terms, "extra": terms["dml"].detach() * 0 + self.extra_value}

    from stages.core.dml.losses import build_dml_loss
    from stages.core.model.encoder import build_model
    from stages.core.model.similarity import COSINE

    config = tiny_params()
    model = build_model(config.model)
    obj = WithExtra(
        model, build_dml_loss("multisimilarity", 4, 16), [], omega=0.0, language_kwargs={}, image_similarity=COSINE
    )
    obj.weights["extra"] = 2.0
    obj.extra_value = 0.25
    opt = torch.optim.SGD([{**g, "lr": 0.0} for g in obj.param_groups()], lr=0.0)
    step = fit.TrainStep(obj, opt, torch.device("cpu"))
    batch = (torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    out = step(batch)
    assert list(out) == ["dml", "language", "extra", "total"]
    assert out["total"] == pytest.approx(float(out["dml"] + 2.0 * 0.25))
    meter = fit.EpochMeter(torch.device("cpu"))
    meter.add(out)
    assert set(meter.epoch_means()) == {"dml", "language", "extra", "total"}
    obj.extra_value = float("inf")
    with pytest.raises(fit.NonFiniteLoss):  # before the weights are touched
        step(batch)

    class Batches:
        def __len__(self) -> int:
            return 2

        def epoch(self, epoch: int) -> list:
            return [batch, batch]

    obj.extra_value = 0.25
    row = fit._train_epoch(step, Batches(), 0, fit.LoopOptions(epochs=1, batch_size=8), show=False)
    assert {"loss/extra", "loss/total", "lr/backbone", "lr/head"} <= set(row)
    obj.extra_value = float("inf")
    with pytest.raises(LangdmlError, match="non-finite extra loss at epoch 1/1, step 1"):
        fit._train_epoch(step, Batches(), 0, fit.LoopOptions(epochs=1, batch_size=8), show=False)


def test_dive_head_trains_with_a_diversity_term_and_exports_a_set_model(tmp_path: Path) -> None:
    dive = {"head": "dive", "slots": 2, "slot_depth": 1, "slot_heads": 2}
    result, paths = run_fit(tmp_path, model=dive, language={"similarity": "smooth_chamfer"})
    first = result.history[0]
    assert {"loss/dml", "loss/language", "loss/diversity", "loss/total"} <= set(first)
    assert 0 < first["loss/diversity"] <= 1
    model, mp = load_model(paths.model_dir)
    assert mp.head == "dive" and model.slots == 2 and model.similarity.name == "smooth_chamfer"
    with torch.no_grad():
        emb = model(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 2))


def test_train_refuses_a_stale_language_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """text.encoder changed but embed-text not re-run: one line naming the key and the stage, no training."""
    from typer.testing import CliRunner

    from stages import paths
    from stages.cli import app

    test_train_stage_on_a_manifest(tmp_path, monkeypatch)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["text"] = {"encoder": "glove:6B-50d"}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    before = paths.MODEL_WEIGHTS.read_bytes()
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "text.encoder = 'sentence-transformers:all-MiniLM-L6-v2'" in line
    assert "'glove:6B-50d'" in line and "re-run `langdml embed-text`" in line
    assert paths.MODEL_WEIGHTS.read_bytes() == before


class _ToyObjective(torch.nn.Module):
    """The smallest task the loop can run: a linear map fitted to fixed targets, with a warm-up flag."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.weights = {"mse": 1.0}
        self.gradient_scales: dict[str, float] = {}
        self.epochs_seen: list[int] = []

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.parameters()), "name": "toy"}]

    def inputs(self, batch, device):
        return tuple(t.to(device) for t in batch)

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def distribute(self, ctx) -> None:
        raise AssertionError("one process: the loop never distributes")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": torch.nn.functional.mse_loss(self.layer(x), y)}


class _ToyBatches:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int) -> list:
        return self.batches


def _toy_fit(root: Path, epochs: int, evaluate=None, every: int = 0, schedule: str = "cosine_step"):
    from stages.core.training.optim import ScheduleSpec

    run = fit.start_run("cpu", 0)
    objective = _ToyObjective()
    batches = _ToyBatches()
    exported: list[int] = []
    spec = fit.FitSpec(
        fit.LoopOptions(epochs=epochs, batch_size=4, clip=0.5, evaluate_every=every),
        fit.OptimSpec("adamw", 0.1, 0.0, schedule, ScheduleSpec(epochs, len(batches))),
        fit.CheckpointSpec(root / "ckpt" / "last.pt", {"params": {"toy": 1}}),
        root / "logs",
        lambda: exported.append(1),
        evaluate=evaluate,
    )
    result = fit.fit(run, objective, batches, spec)
    return result, objective, result.optimizer, exported


def test_one_loop_runs_any_objective_with_its_schedule_hook_and_evaluation(tmp_path: Path) -> None:
    """The loop knows nothing of DML or image-text: a toy objective gets its per-step cosine schedule,
    clipping, per-epoch ``set_epoch``, the evaluation hook every 2 epochs and after the last, the export,
    and a resume that continues the schedule where it stopped."""
    calls: list[int] = []

    def evaluate(epoch: int) -> dict[str, float]:
        calls.append(epoch)
        return {"test/score": float(epoch)}

    result, objective, optimizer, exported = _toy_fit(tmp_path / "a", 5, evaluate, every=2)
    assert calls == [1, 3, 4] and exported == [1]
    assert objective.epochs_seen == [0, 1, 2, 3, 4]
    assert [r.get("test/score") for r in result.history] == [None, 1.0, None, 3.0, 4.0]
    assert result.history[-1]["loss/mse"] < result.history[0]["loss/mse"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine per step: 0 after the last
    assert result.history[0]["lr/toy"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 15)))

    # Interrupted during epoch 3, then resumed: the same weights and schedule as the uninterrupted run.
    def interrupt(epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _toy_fit(tmp_path / "b", 5, interrupt, every=1)
    assert torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)["epoch"] == 2
    resumed, again, _, _ = _toy_fit(tmp_path / "b", 5)
    assert resumed.resumed_from == 2
    for a, b in zip(objective.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_per_epoch_test_metrics_follow_the_official_protocol_and_leave_training_untouched(tmp_path: Path) -> None:
    """train.evaluate_every: test metrics after every epoch, logged as test/<metric>; the best epoch is the
    official summary (best_epoch/...); and evaluating moves no random number, so the weights equal a run
    that never evaluated."""
    from stages.core.data.transforms import eval_transform
    from stages.core.evaluation.per_epoch import best_epoch, per_epoch_metrics

    def evaluation(model):
        dataset = TinyImages(eval_transform(32, model.mean, model.std))
        return per_epoch_metrics(model, dataset, device=torch.device("cpu"), seed=0)

    paths = train_paths(tmp_path / "evaluated")
    write_class_embeddings(paths.class_embeddings)
    params = tiny_params(train={"epochs": 3, "evaluate_every": 1})
    result = train_dml(params, IMAGES, paths, class_names=CLASS_NAMES, evaluation=evaluation)
    assert [int(r["epoch"]) for r in result.history if "test/recall@1" in r] == [1, 2, 3]
    assert {"test/map@r", "test/nmi", "test/recall@8"} <= set(result.history[0])
    rows = (paths.log_dir / "plots" / "metrics" / "test" / "recall@1.tsv").read_text().splitlines()
    assert len(rows) == 4  # a DVC plot: header + one row per epoch
    summary = best_epoch(result.history)
    best = max(result.history, key=lambda r: r["test/recall@1"])
    assert summary["best_epoch/epoch"] == int(best["epoch"]) and summary["best_epoch/map@r"] == best["test/map@r"]
    plain, plain_paths = run_fit(tmp_path / "plain", train={"epochs": 3})
    a = load_file(paths.model_dir / "model.safetensors")
    b = load_file(plain_paths.model_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert best_epoch(plain.history) == {}


def test_the_official_sampler_draws_classes_and_images_with_replacement() -> None:
    """class_random_sampler.py: each of the batch's classes drawn with replacement (a class may come twice), each
    of its m images too; the default draws distinct classes."""
    labels = np.repeat(np.arange(4), 3)  # 4 classes of 3 images
    official = ClassBalancedBatchSampler(labels, m=2, batch_size=8, num_batches=200, seed=0, replacement=True)
    distinct = ClassBalancedBatchSampler(labels, m=2, batch_size=8, num_batches=200, seed=0)
    repeated_class = repeated_image = False
    for batch in official:
        idx = [i for i, _ in batch]
        classes = labels[idx].reshape(4, 2)[:, 0]
        repeated_class |= len(set(classes.tolist())) < 4
        repeated_image |= any(idx[k] == idx[k + 1] for k in range(0, 8, 2))
    assert repeated_class and repeated_image
    for batch in distinct:
        classes = labels[[i for i, _ in batch]].reshape(4, 2)[:, 0]
        assert len(set(classes.tolist())) == 4
    assert list(ClassBalancedBatchSampler(labels, 2, 8, 5, seed=0, replacement=True)) == list(
        ClassBalancedBatchSampler(labels, 2, 8, 5, seed=0, replacement=True)
    )
