"""The serving surfaces held to the pipeline's standard: an index that proves itself before it answers, one error
path for every command (write errors, argument errors, malformed metadata), the API's inputs checked at the
boundary, gallery paths confined to their root, recipes by name only, word-vector files checked when read."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fixtures_datasets import tiny_jpeg
from test_serving import _setup
from typer.testing import CliRunner

import langdml
from stages.cli import app
from stages.core.errors import LangdmlError
from stages.core.io import load_npy, save_npy
from stages.core.recipe import apply_recipe
from stages.core.serving.index import EMBEDDINGS, ITEMS, META, GalleryIndex, model_fingerprint
from stages.core.serving.queries import gallery_table

ROOT = Path(__file__).resolve().parents[1]


def _one_line(result, command: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"langdml {command}: error: "), lines
    return lines[0]


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    return _setup(tmp_path)


def _load(model_dir: Path, index_dir: Path, verify: bool = False) -> GalleryIndex:
    return GalleryIndex.load(index_dir, model_fingerprint(model_dir / "model.safetensors"), verify=verify)


def test_an_index_with_fewer_embeddings_than_items_never_answers(served) -> None:
    model_dir, index_dir, _ = served
    emb = np.load(index_dir / EMBEDDINGS)
    np.save(index_dir / EMBEDDINGS, emb[:-10])
    with pytest.raises(LangdmlError, match=r"embeddings\.npy: not the file this index was built with .*langdml index"):
        _load(model_dir, index_dir)


def test_an_index_whose_items_lost_rows_never_answers(served) -> None:
    model_dir, index_dir, _ = served
    table = pq.read_table(index_dir / ITEMS)
    pq.write_table(table.slice(10), index_dir / ITEMS)
    with pytest.raises(LangdmlError, match=r"items\.parquet: not the file this index was built with"):
        _load(model_dir, index_dir)
    # Even with index.json edited to the new sizes, the row count and numbering still tell.
    meta = json.loads((index_dir / META).read_text())
    meta["files"][ITEMS]["bytes"] = (index_dir / ITEMS).stat().st_size
    (index_dir / META).write_text(json.dumps(meta))
    with pytest.raises(LangdmlError, match="16 embeddings and 6 items, but the index was built with 16"):
        _load(model_dir, index_dir)


def test_an_edited_file_of_the_same_size_is_caught_by_verify(served) -> None:
    model_dir, index_dir, _ = served
    emb = np.load(index_dir / EMBEDDINGS)
    np.save(index_dir / EMBEDDINGS, emb[::-1].copy())  # same shape, other rows: the wrong images would be named
    assert len(_load(model_dir, index_dir)) == 16  # sizes and shapes agree: only the content hash can tell
    with pytest.raises(LangdmlError, match=r"embeddings\.npy: not the file this index was built with \(edited\)"):
        _load(model_dir, index_dir, verify=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("similarity"), r"index\.json: no similarity \(an index of an older langdml"),
        (lambda m: m.pop("files"), r"index\.json: no files"),
        (lambda m: m.update(similarity="cosine"), r"index\.json: malformed"),
        (lambda m: m.update(shape=[16, 9]), r"embeddings\.npy: 16 x 8 float32, but the index was built as 16 x 9"),
    ],
)
def test_malformed_index_metadata_is_one_line(served, edit, message: str) -> None:
    model_dir, index_dir, _ = served
    meta = json.loads((index_dir / META).read_text())
    edit(meta)
    (index_dir / META).write_text(json.dumps(meta))
    with pytest.raises(LangdmlError, match=message):
        _load(model_dir, index_dir)
    (index_dir / META).write_text("{not json")
    with pytest.raises(LangdmlError, match=r"index\.json: unreadable"):
        _load(model_dir, index_dir)


def test_the_api_checks_its_inputs_at_the_boundary(served) -> None:
    model_dir, index_dir, files = served
    retriever = langdml.Retriever.load(model_dir, index_dir)
    good = retriever.embed(files[:2])
    with pytest.raises(langdml.LangdmlError, match=r"query embeddings of shape \(2, 5\) for a gallery of 8"):
        retriever.search(np.zeros((2, 5), np.float32), k=3)
    for k in (0, -1, 17, 2.5):
        with pytest.raises(langdml.LangdmlError, match=rf"k = {k}: ask for 1 to 16"):
            retriever.search(good, k=k)
    with pytest.raises(langdml.LangdmlError, match="must be finite numbers"):
        retriever.search(np.full_like(good, np.nan), k=3)
    with pytest.raises(langdml.LangdmlError, match=r"k = 0: ask for 1 to 16"):
        retriever.search_files(files[:1], k=0)
    with pytest.raises(langdml.LangdmlError, match="torch sees no CUDA GPU"):
        langdml.Retriever.load(model_dir, index_dir, device="cuda")
    with pytest.raises(langdml.LangdmlError, match="use auto, cpu, cuda or cuda:N"):
        langdml.Retriever.load(model_dir, index_dir, device="gpu please")


def test_search_k_below_one_is_a_usage_line(served, monkeypatch) -> None:
    model_dir, _, files = served
    monkeypatch.chdir(model_dir.parent.parent)
    for k in ("0", "-1"):
        line = _one_line(CliRunner().invoke(app, ["search", str(files[0]), "--k", k]), "search")
        assert line == f"langdml search: error: --k {k}: ask for at least 1 neighbour"
        line = _one_line(CliRunner().invoke(app, ["search", "--text", "a cat", "--k", k]), "search")
        assert line == f"langdml search: error: --k {k}: ask for at least 1 neighbour"


@pytest.fixture
def in_data(tmp_path: Path, monkeypatch) -> list[Path]:
    """A served model where the commands look for it (data/model, data/index), the working folder at tmp_path."""
    _, _, files = _setup(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return files


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.EROFS, "Read-only file system [EROFS]"),
        (errno.ENOSPC, "No space left on device [ENOSPC]"),
        (errno.EACCES, "Permission denied [EACCES]"),
    ],
)
def test_write_errors_of_the_serving_commands_are_one_line(in_data, monkeypatch, code: int, cause: str) -> None:
    """What a read-only folder, a full disk or a forbidden one does to embed, search --picture and export (as root
    the folder's mode cannot refuse us, so the file system's answer is raised where a write into out/ starts)."""
    import tempfile

    real = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "out":
            raise OSError(code, os.strerror(code), str(Path(dir) / ".x.tmp"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    for command, out in (("embed", "out/e.parquet"), ("export", "out/m.onnx")):
        line = _one_line(CliRunner().invoke(app, [command, str(in_data[0]), "--out", out]), command)
        assert line == f"langdml {command}: error: cannot write or lock {out}: {cause}; nothing half-written was kept"
    picture = CliRunner().invoke(app, ["search", str(in_data[0]), "--k", "2", "--picture", "out/p.png"])
    assert _one_line(picture, "search").endswith(f"out/p.png: {cause}; nothing half-written was kept")


def test_a_folder_where_a_file_is_to_be_written_is_one_line(in_data) -> None:
    Path("taken.parquet").mkdir()
    line = _one_line(CliRunner().invoke(app, ["embed", str(in_data[0]), "--out", "taken.parquet"]), "embed")
    assert "taken.parquet" in line and "[EISDIR]" in line
    Path("taken.onnx").mkdir()
    line = _one_line(CliRunner().invoke(app, ["export", str(in_data[0]), "--out", "taken.onnx"]), "export")
    assert "taken.onnx" in line and "[EISDIR]" in line
    assert not any(p.name.endswith(".tmp") for p in Path(".").iterdir())


def test_a_short_numpy_write_is_the_full_disk_it_is(tmp_path: Path, monkeypatch) -> None:
    def short(path, array):
        raise OSError("552960 requested and 102336 written")

    monkeypatch.setattr(np, "save", short)
    with pytest.raises(OSError) as err:
        save_npy(tmp_path / "x.npy", np.zeros(3))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x.npy")


def test_an_object_array_is_refused_in_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(LangdmlError, match=r"objects\.npy: not a readable numeric array .*; re-run it"):
        load_npy(tmp_path / "objects.npy", "re-run it")
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(LangdmlError, match=r"text\.npy: an array of <U1, not numbers"):
        load_npy(tmp_path / "text.npy", "re-run it")


def test_gallery_images_must_lie_inside_their_root(tmp_path: Path) -> None:
    outside = tiny_jpeg(tmp_path / "elsewhere" / "secret.jpg")
    folder = tmp_path / "gallery"
    tiny_jpeg(folder / "cats" / "a.jpg")
    (folder / "cats" / "b.jpg").symlink_to(outside)
    with pytest.raises(LangdmlError, match=r"index\.gallery: 1 image\(s\) of the folder .* lead outside it"):
        gallery_table(str(folder))
    (folder / "cats" / "b.jpg").unlink()
    table, _ = gallery_table(str(folder))
    assert table.num_rows == 1
    from stages.core.artifacts import MANIFEST_SCHEMA
    from stages.core.tables import write_parquet

    root = tmp_path / "dataset"
    tiny_jpeg(root / "a.jpg")
    for bad in ("../elsewhere/secret.jpg", str(outside)):
        rows = pa.table(
            {
                "path": ["a.jpg", bad],
                "image_bytes": pa.nulls(2, pa.binary()),
                "label": [0, 1],
                "class_name": ["a", "b"],
                "super_class": ["", ""],
            }
        )
        write_parquet(tmp_path / "gallery.parquet", rows, MANIFEST_SCHEMA, {"root": str(root)})
        with pytest.raises(LangdmlError, match=r"index\.gallery: 1 image path\(s\) of the gallery split lead outside"):
            gallery_table(str(tmp_path / "gallery.parquet"))


def test_recipes_are_names_and_a_malformed_one_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import stages.core.recipe as recipe

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"version": 1, "title": "t", "source": "s", "params": {"omega": 9.0}}))
    for name in (str(own), "../mine", "roth22/../../mine", "roth22/base"):
        with pytest.raises(LangdmlError, match="recipes are named, not paths"):
            apply_recipe(params, name)
    fake = tmp_path / "recipes"
    (fake / "fam").mkdir(parents=True)
    monkeypatch.setattr(recipe, "RECIPES", fake)
    cases = {
        "noversion": (yaml.safe_dump({"title": "t", "source": "s"}), "lacks version"),
        "unparsable": ("version: [1\n", "is not valid YAML"),
        "tagged": ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),
        "alist": ("- 1\n- 2\n", "is not a mapping of recipe fields"),
        "badversion": (yaml.safe_dump({"version": "one", "title": "t", "source": "s"}), "version must be a whole"),
    }
    for name, (text, _) in cases.items():
        (fake / "fam" / f"{name}.yaml").write_text(text)
    for name, (_, message) in cases.items():
        with pytest.raises(LangdmlError, match=message):
            apply_recipe(params, f"fam/{name}")
    (fake / "fam" / "good.yaml").write_text(own.read_text())
    params.write_text("omega: [1\n")
    with pytest.raises(LangdmlError, match=r"params\.yaml: not valid YAML"):
        apply_recipe(params, "fam/good")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("cat\ndog\n", "line 1: no numbers after the word"),
        ("cat 1 2 3\ndog 1 2\n", "line 2: 2 numbers where line 1 has 3"),
        ("cat 1 2 3\ndog 1 x 3\n", "line 2: the row of 'dog' is not all numbers"),
        (bytes(range(256)).decode("latin-1") * 4, "line 1"),
    ],
)
def test_word_vector_files_are_checked_when_read(tmp_path: Path, text: str, message: str) -> None:
    from stages.core.imagetext.towers.bigru import word_vectors

    path = tmp_path / "vectors.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LangdmlError, match=rf"word vectors .*vectors\.txt.*{message}"):
        word_vectors(f"file:{path}", ["cat", "dog"])


def test_a_word_with_spaces_keeps_the_last_numbers_as_its_row(tmp_path: Path) -> None:
    """glove.840B.300d has words with spaces (". . ."): the row is the last `width` fields, as torchtext reads it."""
    from stages.core.imagetext.towers.bigru import word_vectors

    path = tmp_path / "vectors.txt"
    path.write_text("cat 1 2\n. . . 3 4\ndog 5 6\n")
    rows = word_vectors(f"file:{path}", ["cat", ". . .", "dog"])
    np.testing.assert_array_equal(rows, [[1, 2], [3, 4], [5, 6]])
