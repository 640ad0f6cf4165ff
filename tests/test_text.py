"""Text encoders (every family), prompts, the offline hub behaviour and the embed_text stage."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from fixtures_training import tiny_bert
from guards import HANG_GUARD

from stages import paths
from stages.core import hub
from stages.core.config import parse_params
from stages.core.errors import LangdmlError
from stages.core.language.encoders import (
    TEXT_ENCODERS,
    GloveEncoder,
    TextEncoder,
    bundled_minilm,
    create_text_encoder,
    glove_words,
    l2_normalize,
    pool_hidden,
)
from stages.core.language.prompts import average_templates, clean_class_name, embed_names, fill_template
from stages.core.registry import RegistryError
from stages.core.tables import embedding_matrix, read_parquet, write_parquet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return create_text_encoder("sentence-transformers:all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def glove() -> TextEncoder:
    return create_text_encoder("glove:6B-50d", device="cpu")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, so no model a developer has cached can make a test pass."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


def _cos(x: np.ndarray, i: int, j: int) -> float:
    return float(x[i] @ x[j])


# --- families ------------------------------------------------------------------------------------


def test_families_registered() -> None:
    assert TEXT_ENCODERS.names() == ["glove", "hf", "open_clip", "sentence-transformers"]


def test_minilm_shapes_norms_determinism(minilm: TextEncoder) -> None:
    texts = ["a photo of a sparrow", "a photo of a finch", "a photo of a truck"]
    a = minilm.encode(texts)
    assert a.shape == (3, 384) and a.dtype == np.float32 and minilm.dim == 384
    assert _unit_rows(a)
    np.testing.assert_array_equal(a, minilm.encode(texts))
    np.testing.assert_allclose(a, minilm.encode(texts, batch_size=1), atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_semantics(minilm: TextEncoder) -> None:
    e = minilm.encode(["a photo of a sparrow", "a photo of a finch", "a photo of a truck"])
    assert _cos(e, 0, 1) > _cos(e, 0, 2) + 0.2


def test_minilm_aliases_use_the_bundled_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import sentence_transformers

    local = bundled_minilm()
    assert local is not None and (local / "model.safetensors").is_file()
    seen: list[str] = []

    class Fake:
        def __init__(self, source: str, device: str) -> None:
            seen.append(source)

        def eval(self) -> Fake:
            return self

        def encode(self, texts: list[str], **_: object) -> np.ndarray:
            return np.ones((len(texts), 3), np.float32)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Fake)
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        enc = create_text_encoder(f"sentence-transformers:{name}", device="cpu")
        assert enc.name == f"sentence-transformers:{name}" and enc.dim == 3
    assert seen == [str(local), str(local)]


def test_glove_words_and_mean(glove: TextEncoder) -> None:
    assert isinstance(glove, GloveEncoder) and not glove.uses_template and glove.dim == 50
    assert glove_words("T-shirt/top", glove.vocab) == (["t-shirt", "top"], [])
    assert "sparrow-truck" not in glove.vocab
    assert glove_words("sparrow-truck", glove.vocab) == (["sparrow", "truck"], [])
    got = glove.encode(["Ankle  boot", "boot"])
    rows = np.asarray(glove.vectors[[glove.vocab["ankle"], glove.vocab["boot"]]], np.float64)
    mean = rows.mean(0)
    np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(got[1], rows[1] / np.linalg.norm(rows[1]), atol=1e-6)
    np.testing.assert_array_equal(got, glove.encode(["Ankle  boot", "boot"], batch_size=1))


def test_glove_semantics_and_unknown_words(glove: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    e = glove.encode(["sparrow", "finch", "truck"])
    assert _unit_rows(e) and _cos(e, 0, 1) > _cos(e, 0, 2) + 0.3
    with caplog.at_level("WARNING"):
        half = glove.encode(["sparrow qqzzxxq"])
    assert "qqzzxxq" in caplog.text
    np.testing.assert_allclose(half, e[:1], atol=1e-6)
    with pytest.raises(LangdmlError, match="knows no word of 'qqzzxxq'"):
        glove.encode(["qqzzxxq"])


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_hf_localtiny_bert(tmp_path: Path, pooling: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = tiny_bert(tmp_path)
    enc = create_text_encoder(f"hf:{path}", pooling=pooling, device="cpu")
    texts = ["a photo of a sparrow", "a truck"]
    got = enc.encode(texts)
    assert got.shape == (2, 16) and enc.dim == 16 and _unit_rows(got)
    np.testing.assert_array_equal(got, enc.encode(texts))
    np.testing.assert_allclose(got, enc.encode(texts, batch_size=1), atol=1e-5)
    # independently: the model's own outputs, pooled by hand
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    if pooling == "pooler":
        ref = out.pooler_output
    elif pooling == "cls":
        ref = out.last_hidden_state[:, 0]
    else:
        n0 = int(batch["attention_mask"][1].sum())
        ref = torch.stack([out.last_hidden_state[0].mean(0), out.last_hidden_state[1, :n0].mean(0)])
    np.testing.assert_allclose(got, l2_normalize(ref.numpy()), atol=1e-5)


def test_pool_hidden_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_hidden(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool_hidden(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(LangdmlError, match="no pooler output"):
        pool_hidden(hidden, mask, "pooler", None)


def test_open_clip_local_dir_tiny(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")

    enc = create_text_encoder(f"open_clip:local-dir:{tmp_path}", device="cpu")
    texts = ["a photo of a sparrow", "a photo of a truck"]
    got = enc.encode(texts)
    assert got.shape == (2, 8) and enc.dim == 8 and _unit_rows(got)
    np.testing.assert_array_equal(got, enc.encode(texts))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    with torch.no_grad():
        ref = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


# --- errors: one line each, fast, no network -----------------------------------------------------


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "spec", ["hf:langdml-test/no-such-model", "open_clip:ViT-B-32/openai", "sentence-transformers:langdml-test/none"]
)
def test_hub_models_fail_in_one_line_offline(spec: str, monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LangdmlError) as err:
        create_text_encoder(spec, device="cpu")
    msg = _one_line(err)
    assert spec in msg and "HF_HUB_OFFLINE" in msg and "sentence-transformers:all-MiniLM-L6-v2" in msg


def test_unreachable_hub_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint=None, timeout=0: False)
    with pytest.raises(LangdmlError, match="unreachable") as err:
        create_text_encoder("hf:langdml-test/no-such-model", device="cpu")
    _one_line(err)


def test_hub_reachable_probe_is_bounded() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.hub_reachable(f"http://127.0.0.1:{port}", timeout=HANG_GUARD)  # a busy machine: no verdict
    assert not hub.hub_reachable(f"http://127.0.0.1:{port}", timeout=1.0)
    assert not hub.hub_reachable("not a url", timeout=1.0)


def test_cache_only_is_scoped() -> None:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hub.cache_only():
        assert constants.HF_HUB_OFFLINE is True
    assert before == constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(
    ("spec", "pooling", "error", "match"),
    [
        ("all-MiniLM-L6-v2", "mean", LangdmlError, "must look like '<family>:<model>'.*glove, hf, open_clip"),
        ("nope:x", "mean", RegistryError, "known: glove, hf, open_clip, sentence-transformers"),
        ("glove:6B-300d", "mean", LangdmlError, "only glove:6B-50d"),
        ("glove:6B-50d", "max", LangdmlError, "pooler, cls, mean"),
        ("open_clip:ViT-B-32", "mean", LangdmlError, "e.g. open_clip:ViT-B-32/openai"),
        ("open_clip:ViT-Q-99/openai", "mean", LangdmlError, "no architecture 'ViT-Q-99'"),
        ("open_clip:ViT-B-32/nope", "mean", LangdmlError, "no pretrained tag 'nope'.*openai"),
    ],
)
def test_bad_specs(spec: str, pooling: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as err:
        create_text_encoder(spec, pooling=pooling, device="cpu")
    _one_line(err)


def test_hf_pooler_missing_is_one_line(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    path = tiny_bert(tmp_path)  # reuse its tokenizer files; replace the model by one without a pooler
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    DistilBertModel(config).save_pretrained(path)
    with pytest.raises(LangdmlError, match=r"no pooler output; set text\.pooling to cls or mean") as err:
        create_text_encoder(f"hf:{path}", pooling="pooler", device="cpu")
    _one_line(err)
    assert create_text_encoder(f"hf:{path}", pooling="cls", device="cpu").dim == 16


# --- prompts -------------------------------------------------------------------------------------


def test_clean_class_name() -> None:
    assert clean_class_name("  Black_footed__Albatross ") == "Black footed Albatross"
    assert clean_class_name("T-shirt/top") == "T-shirt/top"
    for bad in ("", " _ _ ", None):
        with pytest.raises(LangdmlError, match="empty after cleaning"):
            clean_class_name(bad)


def test_fill_template() -> None:
    assert fill_template("a photo of a {}, a {{kind}}", "finch") == "a photo of a finch, a {{kind}}"
    for bad in ("a photo", "a {} or {}"):
        with pytest.raises(LangdmlError, match="exactly one"):
            fill_template(bad, "x")


def test_average_templates_by_hand() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 0.0]])
    s = np.sqrt(0.5)
    np.testing.assert_allclose(average_templates(emb, 2), [[s, s], [1.0, 0.0]], atol=1e-7)
    with pytest.raises(ValueError, match="2-template groups"):
        average_templates(emb[:3], 2)


class _Letters(TextEncoder):
    """A deterministic stand-in: counts of a, b, c in the text."""

    def __init__(self, uses_template: bool = True) -> None:
        self.uses_template = uses_template
        self.seen: list[str] = []
        super().__init__("letters", None)

    def _embed(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        return np.array([[t.count("a") + 1, t.count("b"), t.count("c")] for t in texts], dtype=np.float64)


def test_embed_names_templates_and_bare_names() -> None:
    enc = _Letters()
    prompts, matrix, used = embed_names(enc, ["b", "cc"], ["{}", "a {}"], batch_size=3)
    assert prompts == ["b | a b", "cc | a cc"] and used == ["{}", "a {}"]
    expected = average_templates(l2_normalize(np.array([[1, 1, 0], [2, 1, 0], [1, 0, 2], [2, 0, 2]], float)), 2)
    np.testing.assert_allclose(matrix, expected, atol=1e-7)
    bare = _Letters(uses_template=False)
    prompts, matrix, used = embed_names(bare, ["b"], ["a photo of a {}"])
    assert prompts == ["b"] and used == ["{}"] and bare.seen[-1] == "b"


# --- the embed_text stage ------------------------------------------------------------------------


def _classes(path: Path, names: list[str | None]) -> None:
    table = pa.table(
        {
            "class_id": pa.array([2 * i for i in range(len(names))], pa.int64()),
            "class_name": pa.array(names, pa.string()),
            "split": pa.array(["train", "test"] * (len(names) // 2) + ["train"] * (len(names) % 2)),
            "n_images": pa.array([3] * len(names), pa.int64()),
            "super_class": pa.array([None] * len(names), pa.string()),
        }
    )
    write_parquet(path, table, table.schema, {"dataset": "tiny"})


def test_embed_text_stage_end_to_end(minilm: TextEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.core.language.encoders
    from stages import embed_text
    from stages.core.artifacts import class_embeddings_schema

    monkeypatch.chdir(tmp_path)
    _classes(paths.CLASSES, ["T-shirt/top", "ankle_boot", "Sparrow"])
    calls: list[tuple[str, str]] = []

    def fake_create(spec: str, *, pooling: str = "mean", device: object = None) -> TextEncoder:
        calls.append((spec, pooling))
        return minilm

    monkeypatch.setattr(stages.core.language.encoders, "create_text_encoder", fake_create)
    params = parse_params({"text": {"templates": ["a photo of a {}", "a picture of a {}"], "device": "cpu"}})
    embed_text.run(params)

    assert calls == [("sentence-transformers:all-MiniLM-L6-v2", "mean")]
    table, meta = read_parquet(paths.CLASS_EMBEDDINGS)
    assert table.schema.remove_metadata() == class_embeddings_schema(384)
    assert meta == {
        "encoder": "sentence-transformers:all-MiniLM-L6-v2",
        "dim": 384,
        "templates": ["a photo of a {}", "a picture of a {}"],
        "normalized": True,
        "pooling": "mean",
        "params": {
            "text.encoder": "sentence-transformers:all-MiniLM-L6-v2",
            "text.templates": ["a photo of a {}", "a picture of a {}"],
            "text.pooling": "mean",
        },
    }
    assert table.column("class_id").to_pylist() == [0, 2, 4]
    assert table.column("class_name").to_pylist() == ["T-shirt/top", "ankle_boot", "Sparrow"]
    assert table.column("prompt").to_pylist()[1] == "a photo of a ankle boot | a picture of a ankle boot"
    emb = embedding_matrix(table.column("embedding"))
    assert _unit_rows(emb)
    direct = minilm.encode(["a photo of a Sparrow", "a picture of a Sparrow"])
    np.testing.assert_allclose(emb[2], l2_normalize(direct.mean(0, keepdims=True))[0], atol=1e-5)


def test_embed_text_stage_glove_names_only(glove: TextEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.core.language.encoders
    from stages import embed_text

    monkeypatch.chdir(tmp_path)
    _classes(paths.CLASSES, ["Coat", "Bag"])
    monkeypatch.setattr(stages.core.language.encoders, "create_text_encoder", lambda *a, **k: glove)
    embed_text.run(parse_params({"text": {"encoder": "glove:6B-50d"}}))
    table, meta = read_parquet(paths.CLASS_EMBEDDINGS)
    assert meta["templates"] == ["{}"] and meta["dim"] == 50
    assert table.column("prompt").to_pylist() == ["Coat", "Bag"]
    np.testing.assert_allclose(embedding_matrix(table.column("embedding")), glove.encode(["coat", "bag"]), atol=1e-6)


def test_embed_text_stage_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import embed_text

    monkeypatch.chdir(tmp_path)
    params = parse_params({"text": {"encoder": "glove:6B-50d"}})
    with pytest.raises(FileNotFoundError, match="langdml prepare"):
        embed_text.run(params)
    _classes(paths.CLASSES, [])
    with pytest.raises(LangdmlError, match="lists no classes"):
        embed_text.run(params)
    _classes(paths.CLASSES, ["Coat", " _ "])
    with pytest.raises(LangdmlError, match="empty after cleaning"):
        embed_text.run(params)
    assert not paths.LANGUAGE.exists() or not any(paths.LANGUAGE.iterdir())
