"""The cross-modal task's adapters, token storage, set heads and training loop on tiny inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_datasets import fake_npm, make_emoji_packages, tiny_jpeg
from fixtures_training import frozen_tower

import stages.core.data.datasets.emoji as em
from stages.core.config.imagetext import ImageTextDataParams, ImageTextModelParams, ImageTextTrainParams
from stages.core.data.datasets.captions import CAPTION_DATASETS, image_manifest, is_precomputed
from stages.core.errors import LangdmlError
from stages.core.imagetext.model import ImageTextModel, MaxPoolHead, embed_sets, load_imagetext
from stages.core.imagetext.objective import ImageTextData, ImageTextPaths, train_imagetext
from stages.core.imagetext.tokens import load_token_sets, ragged_token_sets, save_token_sets
from stages.core.model.heads import DivEHead
from stages.core.npm import integrity
from stages.core.training.live import TIMINGS

torch.set_num_threads(1)


@pytest.fixture
def emoji_root(tmp_path, monkeypatch) -> Path:
    tarballs = make_emoji_packages(tmp_path / "registry")
    fake_npm(tmp_path / "bin", tmp_path / "registry")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    sources = {k: em.Package(p.name, p.version, integrity(tarballs[k])) for k, p in em.SOURCES.items()}
    monkeypatch.setattr(em, "SOURCES", sources)
    return em.fetch_emoji(tmp_path / "emoji")


def test_emoji_captions_are_names_and_keywords_one_test_file_per_image(emoji_root) -> None:
    out = CAPTION_DATASETS.get("emoji")(ImageTextDataParams(name="emoji", root=str(emoji_root)))
    images, captions = out.images.to_pylist(), out.captions.to_pylist()
    test_ids = [r["image_id"] for r in images if r["split"] == "test"]
    assert len(test_ids) == len(set(test_ids))  # one file per test image
    assert all(r["path"].startswith("twitter/") for r in images if r["split"] == "test")  # CC BY art first
    train_files = [r for r in images if r["split"] == "train"]
    assert len(train_files) > len({r["image_id"] for r in train_files})  # views: several vendors per image
    texts = {r["text"] for r in captions}
    assert "grinning face" in texts and "grinning, face" in texts  # the CLDR name and the keywords
    assert {r["split"] for r in captions} == {"train", "test"}
    assert not is_precomputed(out.images)
    manifest = image_manifest(out.images)
    assert manifest["label"].to_pylist() == out.images["image_id"].to_pylist()
    assert manifest["image_bytes"].null_count == len(images)  # read from the paths
    capped = CAPTION_DATASETS.get("emoji")(ImageTextDataParams(name="emoji", root=str(emoji_root), max_images=2))
    assert len({r["image_id"] for r in capped.images.to_pylist()}) == 4  # 2 per split


def test_validation_holdout_replaces_test_with_held_out_training_images(emoji_root) -> None:
    full = CAPTION_DATASETS.get("emoji")(ImageTextDataParams(name="emoji", root=str(emoji_root)))
    train_ids = {r["image_id"] for r in full.images.to_pylist() if r["split"] == "train"}
    test_ids = {r["image_id"] for r in full.images.to_pylist() if r["split"] == "test"}
    params = ImageTextDataParams(name="emoji", root=str(emoji_root), holdout="validation", validation_fraction=0.5)
    out = CAPTION_DATASETS.get("emoji")(params)
    images, captions = out.images.to_pylist(), out.captions.to_pylist()
    held = [r["image_id"] for r in images if r["split"] == "test"]
    kept = {r["image_id"] for r in images if r["split"] == "train"}
    assert len(held) == len(set(held)) == round(0.5 * len(train_ids))  # one file per held-out image
    assert set(held) | kept == train_ids and not set(held) & kept  # carved from train, disjoint
    assert not {r["image_id"] for r in captions} & test_ids  # the test split is never seen
    assert all(r["split"] == ("test" if r["image_id"] in set(held) else "train") for r in captions)
    first = {}
    for r in full.images.to_pylist():
        first.setdefault(r["image_id"], r["path"])
    assert all(r["path"] == first[r["image_id"]] for r in images if r["split"] == "test")
    again = CAPTION_DATASETS.get("emoji")(params)
    assert again.images.equals(out.images)  # seeded
    with pytest.raises(LangdmlError, match="validation_fraction"):
        CAPTION_DATASETS.get("emoji")(
            ImageTextDataParams(name="emoji", root=str(emoji_root), holdout="validation", validation_fraction=0.01)
        )


def _karpathy(root: Path, entries: list[dict]) -> Path:
    for e in entries:
        tiny_jpeg(root / e.get("filepath", "flickr30k-images") / e["filename"])
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    return root


def test_coco_karpathy_split_restval_joins_train_val_is_left_out(tmp_path) -> None:
    def entry(name: str, split: str, n: int = 2) -> dict:
        return {
            "filepath": "val2014",
            "filename": name,
            "split": split,
            "sentences": [{"raw": f"{name} {i} "} for i in range(n)],
        }

    root = _karpathy(
        tmp_path, [entry("a.jpg", "train"), entry("b.jpg", "restval"), entry("c.jpg", "val"), entry("d.jpg", "test", 5)]
    )
    out = CAPTION_DATASETS.get("coco")(ImageTextDataParams(name="coco", root=str(root)))
    assert out.images["path"].to_pylist() == ["val2014/a.jpg", "val2014/b.jpg", "val2014/d.jpg"]
    assert out.images["split"].to_pylist() == ["train", "train", "test"]
    assert out.captions["text"].to_pylist()[0] == "a.jpg 0"  # stripped
    assert out.captions["split"].to_pylist().count("test") == 5
    (root / "val2014" / "d.jpg").unlink()
    with pytest.raises(LangdmlError, match=r"coco: 1 image\(s\) of the test split do not exist .* 'val2014/d.jpg'"):
        CAPTION_DATASETS.get("coco")(ImageTextDataParams(name="coco", root=str(root)))
    (root / "dataset_coco.json").write_text("{not json")
    with pytest.raises(LangdmlError, match="cannot read Karpathy's split file"):
        CAPTION_DATASETS.get("coco")(ImageTextDataParams(name="coco", root=str(root)))


def test_ragged_token_sets_round_trip_and_pad_with_a_mask(tmp_path) -> None:
    rng = np.random.default_rng(0)
    sets = [rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 5, 1)]
    save_token_sets(tmp_path, "caption", ragged_token_sets(sets))
    loaded = load_token_sets(tmp_path, "caption")
    tokens, mask = loaded.subset(np.array([False, True, True])).batch(np.array([1, 0]), torch.device("cpu"))
    assert tokens.shape == (2, 5, 3) and mask.tolist() == [[False, True, True, True, True], [False] * 5]
    np.testing.assert_allclose(tokens[1].numpy(), sets[1], atol=1e-2)  # float16 on disk
    assert (tokens[0, 1:] == 0).all()
    with pytest.raises(LangdmlError, match="no tokens"):
        ragged_token_sets([sets[0], np.zeros((0, 3), np.float32)])
    (tmp_path / "caption_offsets.npy").unlink()
    with pytest.raises(LangdmlError, match="lacks the caption features; run `langdml imagetext-features`"):
        load_token_sets(tmp_path, "caption")


@pytest.mark.parametrize("head", ["dive", "maxpool"])
def test_padded_caption_tokens_change_nothing(head: str) -> None:
    torch.manual_seed(0)
    mp = ImageTextModelParams(head=head, embed_dim=16, slots=3, slot_depth=2, slot_heads=2)
    model = ImageTextModel(8, frozen_tower(6), mp).eval()
    tokens = torch.randn(2, 5, 6)
    mask = torch.tensor([[False, False, True, True, True], [False] * 5])
    garbage = tokens.clone()
    garbage[0, 2:] = 1e3  # whatever sits in the padding
    a = model.text.forward_tokens(tokens, mask)["embeddings"]
    b = model.text.forward_tokens(garbage, mask)["embeddings"]
    torch.testing.assert_close(a, b)
    if head == "dive":
        attention = model.text.forward_tokens(tokens, mask)["attention"]
        assert attention[0, :, 2:].abs().max().item() == 0.0  # masked tokens get zero attention
    assert isinstance(model.text.head, DivEHead if head == "dive" else MaxPoolHead)


def _toy_data(seed: int = 0) -> ImageTextData:
    """6 images (2 views each) with 2 captions each; a caption's tokens are noisy copies of its image's."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    image_sets = [base[i // 2] + 0.1 * rng.normal(size=(4, 8)).astype(np.float32) for i in range(12)]
    caption_sets = [
        np.repeat(base[i // 2][None, :6], 2 + i % 3, axis=0) + 0.1 * rng.normal(size=(2 + i % 3, 6)) for i in range(12)
    ]
    return ImageTextData(
        images=ragged_token_sets(image_sets),
        image_ids=np.repeat(np.arange(6), 2),
        captions=ragged_token_sets([c.astype(np.float32) for c in caption_sets]),
        caption_image_ids=np.repeat(np.arange(6), 2),
        tower=frozen_tower(6),
    )


def test_training_lowers_the_loss_exports_and_resumes(tmp_path, monkeypatch) -> None:
    data = _toy_data()
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)
    tp = ImageTextTrainParams(epochs=6, batch_size=8, lr=3e-3, device="cpu")
    paths = ImageTextPaths(tmp_path / "model", tmp_path / "ckpt" / "last.pt", tmp_path / "logs")
    history = train_imagetext(data, mp, tp, 0, paths, []).history
    assert history[-1]["loss/triplet"] < history[0]["loss/triplet"]
    terms = {"loss/triplet", "loss/mmd", "loss/diversity", "loss/total"}
    assert set(history[0]) == {"epoch", *terms, "lr/image", "lr/text", "lr/text_set", "images_per_s", "step_s"}
    untimed = [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]
    model = load_imagetext(paths.model, torch.device("cpu"))
    sets = embed_sets(model.image, data.images, torch.device("cpu"))
    assert sets.shape == (12, 2, 16) and np.allclose(np.linalg.norm(sets, axis=-1), 1, atol=1e-5)
    # A finished run resumes to the end at once, and the same seed gives the same weights again.
    again = train_imagetext(data, mp, tp, 0, paths, [])
    assert again.resumed_from == 6 and again.history == untimed
    # Killed after its third checkpoint, a run resumes there and ends as the uninterrupted one did.
    import stages.core.training.checkpoint as xm

    real_save, saved = xm.save_checkpoint, []

    def save_then_die(*args, **kwargs) -> None:
        real_save(*args, **kwargs)
        saved.append(1)
        if len(saved) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(xm, "save_checkpoint", save_then_die)
    fresh = ImageTextPaths(tmp_path / "model2", tmp_path / "ckpt2" / "last.pt", tmp_path / "logs2")
    with pytest.raises(KeyboardInterrupt):
        train_imagetext(data, mp, tp, 0, fresh, [])
    assert not fresh.model.exists()
    resumed = train_imagetext(data, mp, tp, 0, fresh, []).history
    assert [r["loss/triplet"] for r in resumed] == pytest.approx([r["loss/triplet"] for r in history], rel=1e-5)
    (paths.model / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LangdmlError, match=r"model\.safetensors is unreadable"):
        load_imagetext(paths.model, torch.device("cpu"))


def test_precomp_layout_rows_and_captions(tmp_path) -> None:
    from stages.core.imagetext.features import save_precomputed_tokens
    from stages.core.imagetext.tokens import load_token_sets

    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_ims.npy", rng.normal(size=(3, 4, 6)).astype(np.float32))
    (tmp_path / "train_caps.txt").write_text("".join(f"caption {i}\n" for i in range(6)))  # 2 per image
    test = rng.normal(size=(2, 4, 6)).astype(np.float32)
    np.save(tmp_path / "testall_ims.npy", test)
    (tmp_path / "testall_caps.txt").write_text("a\nb\nc\nd\n")
    out = CAPTION_DATASETS.get("precomp")(ImageTextDataParams(name="precomp", root=str(tmp_path)))
    assert out.images["path"].to_pylist()[3:] == ["testall_ims.npy#0", "testall_ims.npy#1"]
    assert out.captions["image_id"].to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert is_precomputed(out.images)
    (tmp_path / "features").mkdir()
    shape = save_precomputed_tokens(out.images, str(tmp_path), tmp_path / "features", chunk=2)  # 3 chunks
    sets = load_token_sets(tmp_path / "features", "image")
    assert shape == (5, 4, 6) and sets.tokens.dtype == np.float16 and sets.offsets.tolist() == [0, 4, 8, 12, 16, 20]
    np.testing.assert_allclose(sets.tokens[16:20], test[1], atol=1e-2)
    (tmp_path / "testall_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(LangdmlError, match="whole number of captions per image"):
        CAPTION_DATASETS.get("precomp")(ImageTextDataParams(name="precomp", root=str(tmp_path)))


def test_batches_are_images_with_all_their_captions_and_one_view_each() -> None:
    from stages.core.imagetext.objective import ImageBatches

    data = _toy_data()
    batches = ImageBatches(data.caption_image_ids, data.image_ids, batch_size=4, seed=3)
    assert len(batches) == 2  # 6 images: 4 + 2
    epoch = list(batches.epoch(0))
    shown = np.concatenate([data.image_ids[files] for files, *_ in epoch])
    assert sorted(shown.tolist()) == list(range(6))  # every image once per epoch
    for files, caps, _ in epoch:
        ids = data.image_ids[files]
        assert len(set(ids.tolist())) == len(ids)
        assert sorted(data.caption_image_ids[caps].tolist()) == sorted(np.repeat(ids, 2).tolist())  # all captions
    again = list(ImageBatches(data.caption_image_ids, data.image_ids, batch_size=4, seed=3).epoch(0))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(epoch, again, strict=True))
    assert len(ImageBatches(data.caption_image_ids, data.image_ids, batch_size=5, seed=3)) == 1  # a lone image: dropped


def test_parameter_groups_have_dives_learning_rate_scales() -> None:
    from stages.core.imagetext.objective import ImageTextObjective

    data = _toy_data()
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)
    model = ImageTextModel(data.images.channels, data.tower, mp)
    scales = {"image": 0.1, "text": 1.0, "text_set": 0.1}
    objective = ImageTextObjective(
        model, data, margin=0.2, warmup_epochs=0, mmd=0.01, diversity=0.01, lr=1e-3, lr_scales=scales
    )
    groups = {g["name"]: g for g in objective.param_groups()}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"image": 1e-4, "text": 1e-3, "text_set": 1e-4}
    )
    counted = sum(p.numel() for g in groups.values() for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())  # every parameter in exactly one group
    assert any(p is model.text.head.queries for p in groups["text_set"]["params"])
    assert any(p is model.text.head.local.weight for p in groups["text"]["params"])
