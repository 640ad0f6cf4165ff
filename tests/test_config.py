"""params.yaml validation: every registry-backed name and every losses section checked at load, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.core.config import Params, TrainConfig, load_params, parse_params
from stages.core.errors import LangdmlError, MissingInputError, one_line
from stages.core.registry import Registry, RegistryError, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params.training, TrainConfig)
    assert params.training.model == params.model and params.training.losses == params.losses


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dataset": {"name": "mnist"}}, "dataset.name: unknown dataset 'mnist'; known: cars196"),
        ({"model": {"backbone": "resnet50"}}, "model.backbone: unknown backbone 'resnet50'; known: efficientnet-lite0"),
        ({"text": {"encoder": "sbert:all-MiniLM"}}, "text.encoder: unknown text encoder family 'sbert'"),
        ({"text": {"encoder": "glove"}}, "text.encoder: text encoder family 'glove' must look like 'family:argument'"),
        ({"pseudo_labels": {"classifier": "vit"}}, "pseudo_labels.classifier: unknown ImageNet classifier 'vit'"),
        ({"train": {"loss": "arcface"}}, "train.loss: unknown DML loss 'arcface'; known: contrastive"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer: unknown optimizer 'sgd'; known: adam, adamw"),
        ({"train": {"scheduler": "linear"}}, "train.scheduler: unknown scheduler 'linear'"),
        ({"language": {"guidance": "clip"}}, "language.guidance: unknown language guidance 'clip'; known: both"),
        ({"losses": {"multisimilarty": {"alpha": 2.0}}}, "losses: unknown DML loss 'multisimilarty'"),
        (
            {"losses": {"triplet": {"margn": 0.1}}},
            "losses: losses.triplet.margn: unknown keyword; allowed keys: margin",
        ),
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
        ({"language": {"gamma": float("nan")}}, "language.gamma: Input should be a finite number"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_names_and_values_fail_at_load_in_one_line(raw: dict, message: str) -> None:
    with pytest.raises(LangdmlError) as err:
        parse_params(raw)
    text = str(err.value)
    assert "\n" not in text and text.startswith("params.yaml: ") and message in text, text


def test_registry_errors_are_user_errors_and_specs_have_one_parser() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(LangdmlError, match="unknown thing 'b'; known: a"):
        reg.get("b")
    assert issubclass(RegistryError, LangdmlError) and issubclass(MissingInputError, FileNotFoundError)
    assert parse_spec("timm:resnet50") == ("timm", "resnet50")
    assert parse_spec("open_clip:ViT-B-32/openai") == ("open_clip", "ViT-B-32/openai")
    assert parse_spec("efficientnet-lite0") == ("efficientnet-lite0", "")
    with pytest.raises(LangdmlError, match="must look like"):
        parse_spec(":x")


def test_one_line_keeps_the_last_line_of_a_worker_traceback() -> None:
    assert one_line(ValueError("Caught in worker.\nTraceback ...\nLangdmlError: cannot read image x.png")) == (
        "cannot read image x.png"
    )


def test_cli_shows_user_errors_in_one_line_and_bugs_with_their_traceback(tmp_path: Path, monkeypatch) -> None:
    """A FileNotFoundError from a real bug must keep its traceback; a missing input is one line."""
    from stages import train
    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({}))
    runner = CliRunner()
    missing = runner.invoke(app, ["train"])
    assert missing.exit_code == 1 and "run `langdml prepare`" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    def bug(params: Params) -> None:
        (tmp_path / "no" / "such" / "file").read_text()

    monkeypatch.setattr(train, "run", bug)
    crashed = runner.invoke(app, ["train"])
    assert isinstance(crashed.exception, FileNotFoundError)


def test_list_shows_every_registry() -> None:
    from stages.cli import app

    out = CliRunner().invoke(app, ["list"]).output
    for family in ("datasets", "backbones", "dml losses", "language guidance", "optimizers", "similarities"):
        assert family in out
    assert "shuffled" in out and "multisimilarity" in out and "dive" in out and "smooth_chamfer" in out


def test_a_local_file_a_spec_names_must_lie_in_its_tracked_folder(tmp_path: Path, monkeypatch) -> None:
    """dvc.yaml makes text.local_files and imagetext.features.local_files dependencies; a spec naming a local
    path outside them would change unseen by DVC, so it is a params error naming the key."""
    from stages.core.config.base import local_paths

    monkeypatch.chdir(tmp_path)
    vectors = Path("data/local/text_towers/glove.txt")
    vectors.parent.mkdir(parents=True)
    vectors.write_text("cat 1 2\n")
    Path("elsewhere").mkdir()
    Path("elsewhere/glove.txt").write_text("cat 1 2\n")
    assert local_paths(f"bigru:file:{vectors}") == [vectors]
    assert local_paths("bigru:glove:6B-50d") == [] and local_paths("hf:bert-base-uncased") == []
    features = parse_params({"imagetext": {"features": {"text_tower": f"bigru:file:{vectors}"}}}).imagetext.features
    assert features.local_files == "data/local/text_towers"
    with pytest.raises(LangdmlError, match=r"imagetext\.features: text_tower reads elsewhere/glove\.txt, outside"):
        parse_params({"imagetext": {"features": {"text_tower": "bigru:file:elsewhere/glove.txt"}}})
    moved = {"text_tower": "bigru:file:elsewhere/glove.txt", "local_files": "elsewhere"}
    assert parse_params({"imagetext": {"features": moved}}).imagetext.features.local_files == "elsewhere"
    Path("my-bert").mkdir()
    with pytest.raises(LangdmlError, match=r"text: encoder reads my-bert, outside local_files"):
        parse_params({"text": {"encoder": "hf:my-bert"}})
    with pytest.raises(LangdmlError, match=r"index\.gallery: null is no longer a gallery"):
        parse_params({"index": {"gallery": None}})
