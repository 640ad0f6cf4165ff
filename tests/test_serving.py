"""Using a trained model: the gallery index, image queries, `langdml search` and `import langdml`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from fixtures_datasets import tiny_jpeg
from fixtures_training import frozen_tower
from typer.testing import CliRunner

from stages.cli import app
from stages.core.config import parse_params
from stages.core.errors import LangdmlError
from stages.core.evaluation.search import drop_self, nearest_neighbours
from stages.core.model.encoder import build_model, save_model
from stages.core.model.saved import WEIGHTS_NAME
from stages.core.serving.api import search_picture
from stages.core.serving.index import GalleryIndex, model_fingerprint, write_index
from stages.core.serving.queries import embed_images, image_files

torch.set_num_threads(1)


def _setup(root: Path, head: str = "linear") -> tuple[Path, Path, list[Path]]:
    model_params = parse_params(
        {
            "model": {
                "backbone": "timm:test_resnet",
                "pretrained": False,
                "embed_dim": 8,
                "image_size": 32,
                "head": head,
                "slots": 2,
                "slot_depth": 1,
                "slot_heads": 2,
            }
        }
    ).model
    torch.manual_seed(0)
    model = build_model(model_params).eval()
    save_model(model, model_params, root / "model")
    files = [tiny_jpeg(root / "gallery" / f"c{i % 4}" / f"{i}.jpg", shade=(37 * i) % 256, size=32) for i in range(16)]
    emb = embed_images(model, 32, files, "cpu")
    items = pa.table(
        {
            "row": pa.array(range(16), pa.int64()),
            "path": [str(f) for f in files],
            "label": pa.array([i % 4 for i in range(16)], pa.int64()),
            "class_name": [f"class {i % 4}" for i in range(16)],
        }
    )
    write_index(root / "index", emb, items, model_fingerprint(root / "model" / WEIGHTS_NAME), model.similarity)
    return root / "model", root / "index", files


@pytest.mark.parametrize("head", ["linear", "dive"])
def test_search_returns_exactly_the_neighbours_evaluation_ranks(tmp_path: Path, head: str) -> None:
    import langdml

    model_dir, index_dir, files = _setup(tmp_path, head)
    retriever = langdml.Retriever.load(model_dir, index_dir)
    emb = retriever.embed(files)
    assert emb.shape[0] == 16 and (emb.ndim == 3) == (head == "dive")
    _, rows = retriever.search(emb, k=6)
    evaluation = nearest_neighbours(retriever.index.embeddings, np.arange(16), 5, similarity=retriever.model.similarity)
    # A gallery image's results without itself are what evaluation ranks for it (leave-one-out). (Under the
    # smooth-Chamfer a set need not rank itself first: it is no metric.)
    np.testing.assert_array_equal(drop_self(rows, np.arange(16)), evaluation)
    if head == "linear":
        assert (rows[:, 0] == np.arange(16)).all()


def test_bad_queries_and_stale_or_missing_indexes_are_one_line(tmp_path: Path) -> None:
    model_dir, index_dir, files = _setup(tmp_path)
    retriever = __import__("langdml").Retriever.load(model_dir, index_dir)
    with pytest.raises(LangdmlError, match="the gallery has 16 items"):
        retriever.search_files([files[0]], k=17)
    (tmp_path / "note.txt").write_text("not an image")
    with pytest.raises(LangdmlError, match=r"cannot read image .*note\.txt"):
        retriever.search_files([tmp_path / "note.txt"], k=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LangdmlError, match="no image files in this folder"):
        image_files([tmp_path / "empty"])
    with pytest.raises(LangdmlError, match="no such file or folder"):
        image_files([tmp_path / "gone.jpg"])
    with pytest.raises(LangdmlError, match=r"no index in .*; run `langdml index`"):
        GalleryIndex.load(tmp_path / "nowhere", "x")
    with pytest.raises(LangdmlError, match="built by another model"):
        GalleryIndex.load(index_dir, "another model's fingerprint")


def test_cli_search_prints_a_table_or_json_and_errors_in_one_line(tmp_path: Path, monkeypatch) -> None:
    _, _, files = _setup(tmp_path / "data")  # data/model and data/index, where `langdml search` looks
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["search", str(files[3]), "--k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(files[3]) and lines[1].split()[0] == "1" and "class 3" in lines[1]
    out = json.loads(CliRunner().invoke(app, ["search", str(files[3]), "--k", "2", "--json"]).stdout)
    assert out[0]["results"][0]["path"] == str(files[3]) and len(out[0]["results"]) == 2
    drawn = CliRunner().invoke(app, ["search", str(files[3]), str(files[5]), "--k", "3", "--picture", "out.png"])
    assert drawn.exit_code == 0, drawn.output
    assert Path("out.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["search", str(files[3]), "--k", "99"])
    assert bad.exit_code == 1 and bad.stderr.strip().splitlines() == [
        "langdml search: error: k = 99: ask for 1 to 16 neighbours (the gallery has 16 items)"
    ]


def test_embed_writes_parquet_with_the_models_fingerprint_and_keeps_sets(tmp_path: Path) -> None:
    import langdml
    from stages.core.tables import embedding_matrix, read_parquet

    model_dir, index_dir, _files = _setup(tmp_path, "dive")
    retriever = langdml.Retriever.load(model_dir, index_dir)
    n = retriever.embed_to_parquet([tmp_path / "gallery" / "c1"], tmp_path / "out.parquet")
    table, meta = read_parquet(tmp_path / "out.parquet")
    assert n == 4 and meta["model_sha256"] == retriever.fingerprint and meta["shape"] == [4, 2, 8]
    emb = embedding_matrix(table.column("embedding"))
    assert emb.shape == (4, 2, 8)  # sets stay sets
    np.testing.assert_allclose(emb, retriever.embed([tmp_path / "gallery" / "c1"]), atol=1e-6)


@pytest.mark.parametrize("head", ["linear", "dive"])
def test_onnx_export_equals_pytorch_with_a_dynamic_batch(tmp_path: Path, head: str) -> None:
    import onnxruntime

    from stages.core.model.encoder import load_model
    from stages.core.serving.export import check_batch, export_onnx

    model_dir, _, files = _setup(tmp_path, head)
    model, _params = load_model(model_dir)
    diff = export_onnx(model, 32, tmp_path / "model.onnx", check_batch(model, 32, files[:4]))
    assert diff <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    seven = check_batch(model, 32, files[:7])  # another batch size than the export's
    with torch.inference_mode():
        np.testing.assert_allclose(
            session.run(None, {"images": seven})[0], model(torch.from_numpy(seven)).numpy(), atol=1e-4
        )


def _text_setup(root: Path, n: int) -> tuple[Any, np.ndarray]:
    """An image-text model (a frozen MiniLM tower, 2 slots of 16) in ``root``/model and an index of ``n`` random
    image sets built by it in ``root``/index (paths img<i>.png)."""
    from stages.core.config.imagetext import ImageTextModelParams
    from stages.core.imagetext.model import ImageTextModel, save_imagetext
    from stages.core.model.saved import WEIGHTS_NAME as IMAGETEXT_WEIGHTS

    torch.manual_seed(0)
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)
    model = ImageTextModel(8, frozen_tower(384), mp)
    save_imagetext(model, root / "model")
    images = torch.nn.functional.normalize(torch.randn(n, 2, 16), dim=-1).numpy()
    items = pa.table(
        {
            "row": pa.array(range(n), pa.int64()),
            "path": [f"img{i}.png" for i in range(n)],
            "label": pa.array(range(n), pa.int64()),
            "class_name": [f"caption {i}" for i in range(n)],
        }
    )
    write_index(root / "index", images, items, model_fingerprint(root / "model" / IMAGETEXT_WEIGHTS), model.similarity)
    return model, images


def test_text_queries_rank_the_image_text_index_by_the_models_similarity(tmp_path: Path) -> None:
    from stages.core.serving.text import TextRetriever

    model, images = _text_setup(tmp_path, 12)
    retriever = TextRetriever.load(tmp_path / "model", tmp_path / "index")
    [(text, results)] = retriever.search_texts(["a sleepy cat"], k=5)
    query = torch.from_numpy(retriever.embed_text(["a sleepy cat"]))
    brute = model.similarity(query, torch.from_numpy(images))[0].numpy()
    assert text == "a sleepy cat" and [r["path"] for r in results] == [f"img{i}.png" for i in np.argsort(-brute)[:5]]
    search_picture([(text, results)], tmp_path / "text.png", text_queries=True)
    assert (tmp_path / "text.png").stat().st_size > 1000
    with pytest.raises(LangdmlError, match="a text query is empty"):
        retriever.search_texts(["  "], k=3)
    with pytest.raises(LangdmlError, match=r"run `langdml imagetext-index`"):
        TextRetriever.load(tmp_path / "model", tmp_path / "nowhere")
    with pytest.raises(LangdmlError, match="is an image-text model; load it with TextRetriever"):
        __import__("langdml").Retriever.load(tmp_path / "model", tmp_path / "index")


def test_a_text_query_to_an_image_only_model_is_one_line(tmp_path: Path) -> None:
    from stages.core.serving.text import TextRetriever

    model_dir, index_dir, _ = _setup(tmp_path)
    with pytest.raises(LangdmlError, match="is an image-only model: text queries need the image-text model"):
        TextRetriever.load(str(model_dir), str(index_dir))


def test_the_python_example_in_docs_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    _setup(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/serving.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("class 0 -> ['class 0'")


def test_the_index_stage_takes_a_folder_as_its_gallery(tmp_path: Path, monkeypatch) -> None:
    import langdml
    from stages import index

    _, _, files = _setup(tmp_path / "data")  # data/model, and images under data/gallery/c0..c3
    monkeypatch.chdir(tmp_path)
    params = parse_params({"index": {"gallery": "data/gallery"}, "evaluate": {"device": "cpu", "num_workers": 0}})
    index.run(params)
    retriever = langdml.Retriever.load()
    assert len(retriever.index) == 16 and {it["class_name"] for it in retriever.index.items} == {"c0", "c1", "c2", "c3"}
    [(_, results)] = retriever.search_files([files[2]], k=1)
    assert results[0]["path"] == str(files[2].resolve()) and results[0]["class_name"] == "c2"


def test_the_text_example_in_docs_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = doc.split("```python\n")[2].split("```", 1)[0]
    _text_setup(tmp_path / "data" / "imagetext", 6)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/serving.md", "exec"), scope)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" -> ")[0] for ln in lines] == ["a sleepy cat", "a red car"]
    assert scope["sets"].shape == (1, 2, 16)
