"""The embedding loop and the evaluate-pretrained / evaluate stages end to end on a tiny test split."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from stages import evaluate, evaluate_pretrained, paths
from stages.core.artifacts import MANIFEST_SCHEMA
from stages.core.config import Params, parse_params
from stages.core.dml.evaluate import read_best_epoch
from stages.core.errors import LangdmlError
from stages.core.evaluation.embedding import embed_dataset
from stages.core.evaluation.metrics import retrieval_metrics
from stages.core.evaluation.report import GALLERY_NEIGHBOURS, gallery_size, similarity_size, slot_size
from stages.core.model.similarity import SimilaritySpec
from stages.core.tables import embedding_array, embedding_matrix, embedding_type, read_parquet, write_parquet

torch.set_num_threads(1)

CLASS_NAMES = {3: "t-shirt", 5: "sandal", 7: "sneaker", 9: "ankle boot"}
METRIC_KEYS = {
    "recall@1",
    "recall@2",
    "map@r",
    "r_precision",
    "nmi",
    "n_queries",
    "n_classes",
    "n_skipped_queries",
}


# ---------------------------------------------------------------- embed_dataset


class _Net(nn.Module):
    """BatchNorm and dropout make train-mode and eval-mode outputs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.lin(x)))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _vectors(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n))


def test_embed_dataset_eval_mode_order_and_norm() -> None:
    torch.manual_seed(0)
    net = _Net().train()
    data = _vectors()
    emb = embed_dataset(net, data, batch_size=3, num_workers=0, device="cpu")
    assert net.training  # given back its mode
    assert emb.dtype == np.float32 and emb.shape == (10, 3)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        expected = nn.functional.normalize(net.eval()(data.tensors[0]), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)  # eval mode, dataset order, batch size irrelevant


def test_embed_dataset_bound_method() -> None:
    net = _Net().train()
    data = _vectors()
    emb = embed_dataset(net.pooled, data, batch_size=4, num_workers=0, device="cpu")
    with torch.no_grad():
        expected = nn.functional.normalize(net.lin(data.tensors[0]), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert net.training


def test_embed_dataset_empty() -> None:
    empty: Dataset = TensorDataset(torch.zeros(0, 4), torch.zeros(0))
    with pytest.raises(LangdmlError, match="empty"):
        embed_dataset(_Net(), empty, batch_size=4, num_workers=0, device="cpu")


def test_embed_dataset_keeps_sets_and_parquet_round_trips_them(tmp_path: Path) -> None:
    """A set-valued model (B x K x D) is normalised per slot and never flattened into one K*D vector."""
    from stages.core.artifacts import read_test_embeddings, write_test_embeddings

    lin = nn.Linear(4, 2 * 3)
    data = _vectors()
    emb = embed_dataset(lambda x: lin(x).view(-1, 2, 3), data, batch_size=4, num_workers=0, device="cpu")
    assert emb.shape == (10, 2, 3)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    path = tmp_path / "emb.parquet"
    write_test_embeddings(path, np.arange(10) % 2, [f"c{i % 2}" for i in range(10)], emb, {"model": "toy"})
    table, meta = read_test_embeddings(path)
    assert (meta["dim"], meta["slots"]) == (3, 2)
    np.testing.assert_array_equal(embedding_matrix(table.column("embedding")), emb)
    with pytest.raises(LangdmlError, match="B x D or B x K x D"):
        embed_dataset(lambda x: x.view(-1, 1, 2, 2), data, batch_size=4, num_workers=0, device="cpu")


# ---------------------------------------------------------------- the stages


def _png(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    pixels = np.clip(np.asarray(colour) + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_manifest(root: Path, labels: list[int]) -> None:
    rng = np.random.default_rng(0)
    colours = {3: (230, 30, 30), 5: (30, 230, 30), 7: (30, 30, 230), 9: (230, 230, 30)}
    table = pa.table(
        {
            "path": pa.nulls(len(labels), pa.string()),
            "image_bytes": [_png(colours[c], rng) for c in labels],
            "label": pa.array(labels, pa.int64()),
            "class_name": [CLASS_NAMES[c] for c in labels],
            "super_class": pa.nulls(len(labels), pa.string()),
        }
    )
    write_parquet(paths.TEST_MANIFEST, table, MANIFEST_SCHEMA, {"dataset": "toy", "root": str(root)})


def _write_class_embeddings(dim: int = 6) -> None:
    rng = np.random.default_rng(1)
    ids = sorted(CLASS_NAMES)
    vecs = rng.standard_normal((len(ids), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    schema = pa.schema(
        [
            ("class_id", pa.int64()),
            ("class_name", pa.string()),
            ("prompt", pa.string()),
            ("embedding", embedding_type(dim)),
        ]
    )
    table = pa.table(
        {
            "class_id": ids,
            "class_name": [CLASS_NAMES[i] for i in ids],
            "prompt": [f"a photo of a {CLASS_NAMES[i]}" for i in ids],
            "embedding": embedding_array(vecs),
        }
    )
    made_with = _params().class_embeddings_params()
    write_parquet(
        paths.CLASS_EMBEDDINGS, table, schema, {"encoder": "toy", "dim": dim, "normalized": True, "params": made_with}
    )


def _params() -> Params:
    return parse_params(
        {
            "model": {"pretrained": False, "image_size": 32, "embed_dim": 8},
            "evaluate": {
                "batch_size": 8,
                "ks": [1, 2],
                "num_workers": 0,
                "gallery_queries": 3,
                "device": "cpu",
            },
        }
    )


def _save_model(params: Params, corrupt: bool = False) -> None:
    from stages.core.model import encoder as vision

    torch.manual_seed(0)
    model = vision.build_model(params.model)
    if corrupt:
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))
    vision.save_model(model, params.model, paths.MODEL)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    _write_manifest(tmp_path, [3, 5, 7, 9] * 3 + [3, 5])
    return tmp_path


@pytest.mark.slow
def test_stages_end_to_end(workdir: Path) -> None:
    params = _params()
    _write_class_embeddings()
    _save_model(params)

    evaluate_pretrained.run(params)
    control = json.loads(paths.PRETRAINED_METRICS.read_text())
    assert set(control) == METRIC_KEYS
    assert (control["n_queries"], control["n_classes"], control["n_skipped_queries"]) == (14, 4, 0)

    evaluate.run(params)
    metrics = json.loads(paths.METRICS.read_text())
    assert set(metrics) == METRIC_KEYS | {f"pretrained/{k}" for k in METRIC_KEYS}
    assert all(isinstance(v, int | float) for v in metrics.values())  # flat
    assert {k: metrics[f"pretrained/{k}"] for k in control} == control

    table, meta = read_parquet(paths.TEST_EMBEDDINGS)
    assert table.column_names == ["index", "label", "class_name", "embedding"]
    assert table.column("index").to_pylist() == list(range(14))
    assert table.column("label").to_pylist() == [3, 5, 7, 9] * 3 + [3, 5]
    assert table.column("class_name").to_pylist()[:2] == ["t-shirt", "sandal"]
    emb = embedding_matrix(table.column("embedding"))
    assert emb.shape == (14, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert meta["model"]["embed_dim"] == 8 and meta["dim"] == 8 and meta["normalized"] is True
    again = retrieval_metrics(emb, query_labels=table.column("label").to_numpy(), ks=(1, 2))
    assert {k: metrics[k] for k in again} == pytest.approx(again)

    lines = paths.RECALL_CSV.read_text().splitlines()
    assert lines[0] == "k,recall"
    assert [float(x.split(",")[1]) for x in lines[1:]] == pytest.approx([metrics["recall@1"], metrics["recall@2"]])
    with Image.open(paths.GALLERY) as im:
        assert im.size == gallery_size(3, GALLERY_NEIGHBOURS)
    with Image.open(paths.SIMILARITY) as im:
        assert im.size == similarity_size()

    # the index stage takes these rows instead of embedding the test split again: exactly what it would compute
    from stages.core.model.encoder import load_model
    from stages.core.serving.queries import embed_table, evaluated_embeddings, gallery_table

    gallery = str(paths.TEST_MANIFEST)
    reused = evaluated_embeddings(gallery, paths.TEST_EMBEDDINGS, paths.MODEL_WEIGHTS)
    model, model_params = load_model(paths.MODEL, torch.device("cpu"))
    fresh = embed_table(model, model_params.image_size, *gallery_table(gallery), torch.device("cpu"))
    assert reused is not None and np.array_equal(reused, fresh)
    other = paths.DATA / "other.parquet"
    other.write_bytes(paths.TEST_MANIFEST.read_bytes() + b"\0")  # another file: never reused
    assert evaluated_embeddings(str(other), paths.TEST_EMBEDDINGS, paths.MODEL_WEIGHTS) is None
    paths.MODEL_WEIGHTS.write_bytes(paths.MODEL_WEIGHTS.read_bytes() + b"\0")  # other weights: never reused
    assert evaluated_embeddings(gallery, paths.TEST_EMBEDDINGS, paths.MODEL_WEIGHTS) is None


def test_evaluate_a_set_model(workdir: Path) -> None:
    """A DivE model: set embeddings in the Parquet, smooth-Chamfer retrieval, the slot picture."""
    params = _params()
    params = params.model_copy(
        update={"model": params.model.model_copy(update={"head": "dive", "slots": 3, "slot_depth": 1, "slot_heads": 2})}
    )
    _write_class_embeddings()
    _save_model(params)
    evaluate_pretrained.run(params)
    evaluate.run(params)
    metrics = json.loads(paths.METRICS.read_text())
    table, meta = read_parquet(paths.TEST_EMBEDDINGS)
    emb = embedding_matrix(table.column("embedding"))
    assert emb.shape == (14, 3, 8) and (meta["slots"], meta["dim"]) == (3, 8)
    again = retrieval_metrics(
        emb,
        query_labels=table.column("label").to_numpy(),
        ks=(1, 2),
        similarity=SimilaritySpec("smooth_chamfer"),
        nmi=False,
    )
    assert {k: metrics[k] for k in again} == pytest.approx(again)
    with Image.open(paths.SLOTS) as im:
        assert im.size == slot_size(3, 3)


def test_evaluate_without_language_cache_skips_similarity(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = _params()
    _save_model(params)
    evaluate_pretrained.run(params)
    paths.SIMILARITY.parent.mkdir(parents=True, exist_ok=True)
    paths.SIMILARITY.write_bytes(b"stale picture of an older model")
    with caplog.at_level("INFO"):
        evaluate.run(params)
    assert paths.METRICS.is_file() and paths.GALLERY.is_file()
    assert not paths.SIMILARITY.exists()
    assert "similarity.png skipped" in caplog.text


def _assert_no_outputs() -> None:
    assert not paths.METRICS.exists()
    assert not paths.TEST_EMBEDDINGS.exists()
    assert not paths.GALLERY.exists()


def test_evaluate_needs_the_control_first(workdir: Path) -> None:
    with pytest.raises(LangdmlError, match="langdml evaluate-pretrained"):
        evaluate.run(_params())
    _assert_no_outputs()


def test_evaluate_needs_a_model(workdir: Path) -> None:
    paths.PRETRAINED_METRICS.parent.mkdir(parents=True)
    paths.PRETRAINED_METRICS.write_text("{}")
    with pytest.raises(LangdmlError, match="langdml train"):
        evaluate.run(_params())
    _assert_no_outputs()


def test_evaluate_nan_embeddings(workdir: Path) -> None:
    params = _params()
    _save_model(params, corrupt=True)
    paths.PRETRAINED_METRICS.parent.mkdir(parents=True)
    control = {"n_queries": 14, "n_skipped_queries": 0, "n_classes": 4}  # of this test split
    paths.PRETRAINED_METRICS.write_text(json.dumps(control))
    with pytest.raises(LangdmlError, match="NaN") as err:
        evaluate.run(params)
    assert "\n" not in str(err.value)
    _assert_no_outputs()


def test_one_class_test_split(workdir: Path) -> None:
    _write_manifest(workdir, [5, 5, 5])
    with pytest.raises(LangdmlError, match="at least 2 classes"):
        evaluate_pretrained.run(_params())
    assert not paths.PRETRAINED_METRICS.exists()


def test_missing_manifest_names_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="langdml prepare"):
        evaluate_pretrained.run(_params())


def test_cli_error_is_one_line(workdir: Path) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    Path("params.yaml").write_text(json.dumps(_params().model_dump()))
    result = CliRunner().invoke(app, ["evaluate"])
    assert result.exit_code == 1
    out = result.output.strip()
    assert out.count("\n") == 0 and "langdml evaluate: error:" in out and "evaluate-pretrained" in out


def test_best_epoch_summary_is_read_from_the_training_test_metrics(tmp_path: Path) -> None:
    path = tmp_path / "test_per_epoch.json"
    assert read_best_epoch(path) == {}
    rows = [
        {"epoch": 1.0, "test/recall@1": 0.5, "test/map@r": 0.2},
        {"epoch": 2.0, "test/recall@1": 0.7, "test/map@r": 0.3},
        {"epoch": 3.0, "test/recall@1": 0.6, "test/map@r": 0.35},
    ]
    path.write_text(json.dumps({"every": 1, "epochs": rows}))
    assert read_best_epoch(path) == {  # each metric's maximum (MAP@R's is epoch 3's), and the best R@1 epoch
        "max_over_epochs/recall@1": 0.7,
        "max_over_epochs/map@r": 0.35,
        "best_epoch/epoch": 2,
        "best_epoch/recall@1": 0.7,
        "best_epoch/map@r": 0.3,
    }
    path.write_text("{broken")
    with pytest.raises(LangdmlError, match=r"test_per_epoch\.json: unreadable"):
        read_best_epoch(path)
