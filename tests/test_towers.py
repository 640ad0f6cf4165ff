"""Trainable text towers of the image-text model: the bi-GRU over word vectors and a fine-tuned transformer,
their caches of token ids, DivE's caption and region augmentation, and the slot module's official details."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_training import frozen_tower, tiny_bert

from stages.core.config.imagetext import ImageTextModelParams
from stages.core.errors import LangdmlError
from stages.core.imagetext.model import ImageTextModel, embed_sets, load_imagetext, save_imagetext
from stages.core.imagetext.objective import ImageTextData, ImageTextObjective
from stages.core.imagetext.tokens import ragged_token_sets
from stages.core.imagetext.towers import augment_ids, drop_regions, tower_kind
from stages.core.imagetext.towers.bigru import word_vectors
from stages.core.imagetext.vocabulary import END, MASK, SPECIALS, START, UNK, build_vocabulary, word_ids
from stages.core.model.heads import DivEHead, SlotOptions, sine_positions

CAPTIONS = ["A dog runs on the grass.", "Two dogs play", "a red car", "A car on the road"]
TRAIN = np.array([True, True, True, False])
MP = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2)


def _bigru_cache(spec: str = "bigru:random:8"):
    kind, arg = tower_kind(spec)
    return kind.cache(arg, CAPTIONS, TRAIN, 32, "cpu")


def test_the_vocabulary_is_the_training_captions_words_after_the_special_rows() -> None:
    vocab = build_vocabulary([c for c, t in zip(CAPTIONS, TRAIN, strict=True) if t])
    assert vocab[: len(SPECIALS)] == list(SPECIALS)
    assert vocab[len(SPECIALS) : len(SPECIALS) + 2] == ["a", "car"]  # by count, then alphabetical
    assert "road" not in vocab  # a test caption's word is unknown
    row = {w: i for i, w in enumerate(vocab)}
    ids = word_ids("A car on the road", row, 32)
    assert ids[0] == START and ids[-1] == END and ids[-2] == UNK and len(ids) == 7
    assert len(word_ids("a dog " * 50, row, 10)) == 10  # at most max_tokens, start and end kept


def test_word_vectors_come_from_glove_a_text_file_or_nowhere(tmp_path: Path) -> None:
    from stages.core.language.encoders import create_text_encoder

    glove = create_text_encoder("glove:6B-50d")
    rows = word_vectors("glove:6B-50d", ["dog", "qqzzxxq", "o'clock"])
    np.testing.assert_array_equal(rows[0], np.asarray(glove.vectors[glove.vocab["dog"]], dtype=np.float32))
    assert np.isnan(rows[1]).all()  # missing: keeps its random initialisation
    assert np.isfinite(rows[2]).all()  # the official word-hit trick: o'clock -> oclock or o'clock itself
    text = tmp_path / "vectors.txt"
    text.write_text("dog 1 2 3\ncat 4 5 6\ndog 9 9 9\n")
    rows = word_vectors(f"file:{text}", ["cat", "dog", "emu"])
    np.testing.assert_array_equal(rows[:2], [[4, 5, 6], [1, 2, 3]])  # the first row of a repeated word
    assert np.isnan(rows[2]).all()
    assert word_vectors("random:5", ["a"]).shape == (1, 5)
    with pytest.raises(LangdmlError, match=r"glove\.840B\.300d\.zip"):
        word_vectors(f"file:{tmp_path / 'none.txt'}", ["a"])
    with pytest.raises(LangdmlError, match="unknown bi-GRU word vectors"):
        word_vectors("word2vec:x", ["a"])


def test_the_bigru_tower_embeds_ids_ignoring_padding_and_starts_from_the_word_vectors() -> None:
    cache = _bigru_cache("bigru:glove:6B-50d")
    assert {len(s) for s in cache.sets} >= {5} and all(s.dtype == np.int32 for s in cache.sets)
    torch.manual_seed(0)
    model = ImageTextModel(8, cache.tower, MP).eval()
    cache.tower.kind.initialise(model.text, cache.tower, cache.arrays)
    dog = cache.tower.details["vocab"].index("dog")
    np.testing.assert_array_equal(model.text.embed.weight[dog].detach().numpy(), cache.arrays["word_vectors"][dog])
    sets = ragged_token_sets(cache.sets)
    ids, mask = sets.batch(np.arange(4), torch.device("cpu"))
    out = model.text.forward_tokens(ids, mask)["embeddings"]
    garbage = ids.clone()
    garbage[mask] = 7  # whatever sits in the padding
    torch.testing.assert_close(model.text.forward_tokens(garbage, mask)["embeddings"], out)
    alone = model.text.forward_tokens(ids[2:3, : int((~mask[2]).sum())])["embeddings"]
    torch.testing.assert_close(alone, out[2:3])  # a caption scores the same alone as padded in a batch
    # the global feature: the GRU's final states averaged over the two directions
    words = model.text.embed(ids[2:3, : int((~mask[2]).sum())])
    _, last = model.text.rnn(words)
    head = model.text.head.forward_tokens(words, None, last.mean(dim=0))["embeddings"]
    torch.testing.assert_close(head, out[2:3])


def test_parameter_groups_put_the_word_embeddings_and_gru_at_the_text_scale() -> None:
    cache = _bigru_cache()
    model = ImageTextModel(8, cache.tower, MP)
    data = ImageTextData(
        images=ragged_token_sets([np.ones((2, 8), np.float32)] * 4),
        image_ids=np.arange(4),
        captions=ragged_token_sets(cache.sets),
        caption_image_ids=np.arange(4),
        tower=cache.tower,
    )
    scales = {"image": 0.1, "text": 1.0, "text_set": 0.1}
    objective = ImageTextObjective(model, data, margin=0.2, warmup_epochs=0, mmd=0.01, diversity=0.01, lr_scales=scales)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in objective.param_groups()}
    assert id(model.text.embed.weight) in groups["text"] and id(model.text.rnn.weight_hh_l0) in groups["text"]
    assert id(model.text.head.queries) in groups["text_set"]
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


def test_caption_augmentation_masks_swaps_or_deletes_inner_tokens_at_the_official_rates() -> None:
    rng = np.random.default_rng(0)
    ids = np.array([START, *range(10, 30), END], dtype=np.int32)
    assert augment_ids(ids, 0.0, 100, MASK, rng) is ids
    masked = swapped = deleted = kept = 0
    for _ in range(3000):
        out = augment_ids(ids, 0.2, 100, MASK, rng)
        assert out[0] == START and out[-1] == END and out.dtype == ids.dtype
        inner = out[1:-1]
        masked += int((inner == MASK).sum())
        kept += int(np.isin(inner, ids[1:-1]).sum())
        deleted += len(ids) - len(out)
        swapped += len(inner) - int((inner == MASK).sum()) - int(np.isin(inner, ids[1:-1]).sum())
    n = 3000 * 20
    # per token: 0.2 x 0.5 masked, 0.2 x 0.1 random (a random id may hit a caption word), 0.2 x 0.4 deleted
    assert masked / n == pytest.approx(0.10, abs=0.01)
    assert deleted / n == pytest.approx(0.08, abs=0.01)
    assert (swapped + kept) / n == pytest.approx(0.82, abs=0.01)
    again = augment_ids(ids, 0.2, 100, MASK, np.random.default_rng(5))
    np.testing.assert_array_equal(again, augment_ids(ids, 0.2, 100, MASK, np.random.default_rng(5)))


def test_region_dropping_keeps_each_region_with_one_minus_p_and_never_empties_a_set() -> None:
    rng = np.random.default_rng(0)
    tokens = np.arange(36 * 2, dtype=np.float32).reshape(36, 2)
    kept = [len(drop_regions(tokens, 0.2, rng)) for _ in range(2000)]
    assert np.mean(kept) / 36 == pytest.approx(0.8, abs=0.01)
    assert all(len(drop_regions(tokens[:1], 0.99, rng)) == 1 for _ in range(50))
    assert drop_regions(tokens, 0.0, rng) is tokens


def test_an_hf_tower_fine_tunes_a_local_tiny_bert_and_reloads_without_the_hub(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    path = tiny_bert(tmp_path / "bert")
    kind, arg = tower_kind(f"hf:{path}")
    cache = kind.cache(arg, ["a photo of a sparrow", "a truck"], np.array([True, True]), 32, "cpu")
    assert [len(s) for s in cache.sets] == [7, 4] and all(s[0] == 2 and s[-1] == 3 for s in cache.sets)  # [CLS] [SEP]
    assert cache.tower.mask_id == 4 and cache.tower.vocab_size == 10
    torch.manual_seed(0)
    model = ImageTextModel(8, cache.tower, MP).eval()
    kind.initialise(model.text, cache.tower, cache.arrays)
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(path).state_dict()
    for name, value in model.text.encoder.state_dict().items():
        torch.testing.assert_close(value, pretrained[name])
    emb = embed_sets(model.text, ragged_token_sets(cache.sets), torch.device("cpu"))
    assert emb.shape == (2, 2, 16)
    save_imagetext(model, tmp_path / "model")
    again = load_imagetext(tmp_path / "model", torch.device("cpu"))  # built from the saved config
    np.testing.assert_allclose(
        embed_sets(again.text, ragged_token_sets(cache.sets), torch.device("cpu")), emb, atol=1e-6
    )
    with pytest.raises(LangdmlError, match="text tower hf:langdml-test/nope"):
        kind.cache("langdml-test/nope", ["a"], np.array([True]), 32, "cpu")


def test_the_official_slot_options_change_the_module_as_the_flags_say() -> None:
    options = SlotOptions(head_dim=8, dropout=0.1, global_pool="max", local_dropout=0.1, local_bn=True)
    head = DivEHead(12, 16, slots=3, depth=2, heads=4, options=options)
    assert head.block.attention.to_q.out_features == 32 and head.block.attention.scale == pytest.approx(8**-0.5)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.local_mlp.modules())
    head.eval()
    tokens = torch.randn(2, 5, 12)
    local = head.project(tokens)
    glob = local.max(dim=1).values
    expected = torch.nn.functional.normalize(
        head.norm_slots(_slots(head, local)) + head.norm_global(glob)[:, None], dim=-1
    )
    torch.testing.assert_close(head.forward_tokens(tokens)["embeddings"], expected)
    raw = DivEHead(12, 16, slots=3, depth=1, heads=4, options=SlotOptions(project=False))
    assert not hasattr(raw, "local") and raw.block.attention.to_k.in_features == 12  # attends over the raw tokens


def _slots(head: DivEHead, local: torch.Tensor) -> torch.Tensor:
    slots = head.queries.expand(local.shape[0], -1, -1)
    for _ in range(head.depth):
        slots, _ = head.block(slots, local)
    return slots


def test_sine_key_positions_follow_the_official_formula_per_caption_length() -> None:
    mask = torch.tensor([[False, False, False, True], [False] * 4])
    pe = sine_positions(mask, 6)
    for b, length in ((0, 3), (1, 4)):
        for p in range(length):
            pos = (p + 1) / (length + 1e-6) * 2 * np.pi
            for i in range(6):
                angle = pos / 10000 ** (2 * (i // 2) / 6)
                want = np.sin(angle) if i % 2 == 0 else np.cos(angle)
                assert pe[b, p, i].item() == pytest.approx(want, abs=1e-5)
    assert (pe[0, 3] == 0).all()  # padding gets none
    head = DivEHead(6, 8, slots=2, depth=1, heads=2, options=SlotOptions(key_positions=True)).eval()
    tokens = torch.randn(1, 4, 6)
    flipped = tokens.flip(1)
    plain = DivEHead(6, 8, slots=2, depth=1, heads=2).eval()
    plain.load_state_dict(head.state_dict())
    # without positions the set is order-free; with them the order counts
    torch.testing.assert_close(plain.forward_tokens(tokens)["embeddings"], plain.forward_tokens(flipped)["embeddings"])
    assert not torch.allclose(head.forward_tokens(tokens)["embeddings"], head.forward_tokens(flipped)["embeddings"])


def test_a_frozen_tower_is_the_set_head_over_cached_features() -> None:
    model = ImageTextModel(8, frozen_tower(6), MP)
    assert isinstance(model.text.head, DivEHead) and model.text.set_module() == model.text.head.set_module()


def test_a_bigru_run_with_dives_augmentation_learns_and_repeats_bit_for_bit(tmp_path: Path) -> None:
    from stages.core.config.imagetext import ImageTextTrainParams
    from stages.core.imagetext.objective import ImageTextPaths, train_imagetext

    words = ["dog", "cat", "car", "boat", "tree", "house"]
    captions = [f"a photo of a {words[i // 3]} number {i % 3}" for i in range(18)]  # 6 images x 3 captions
    cache = tower_kind("bigru:glove:6B-50d")[0].cache("glove:6B-50d", captions, np.ones(18, bool), 32, "cpu")
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    data = ImageTextData(
        images=ragged_token_sets([base[i] + 0.1 * rng.normal(size=(5, 8)).astype(np.float32) for i in range(6)]),
        image_ids=np.arange(6),
        captions=ragged_token_sets(cache.sets),
        caption_image_ids=np.repeat(np.arange(6), 3),
        tower=cache.tower,
        text_arrays=cache.arrays,
    )
    mp = ImageTextModelParams(embed_dim=16, slots=2, slot_depth=1, slot_heads=2, dropout=0.1, text_positions=True)
    tp = ImageTextTrainParams(epochs=8, batch_size=6, lr=3e-3, device="cpu", caption_drop=0.2, region_drop=0.2)
    runs = []
    for name in ("a", "b"):
        paths = ImageTextPaths(tmp_path / name, tmp_path / f"ckpt-{name}" / "last.pt", tmp_path / f"logs-{name}")
        history = train_imagetext(data, mp, tp, 0, paths, []).history
        runs.append(((tmp_path / name / "model.safetensors").read_bytes(), [r["loss/triplet"] for r in history]))
    assert runs[0] == runs[1]  # seeded: augmentation and dropout draw the same in a rerun
    assert runs[0][1][-1] < runs[0][1][0]


def test_bad_text_tower_inputs_are_one_line(tmp_path: Path) -> None:
    from stages.core.config.imagetext import ImageTextFeatureParams
    from stages.core.imagetext.tokens import load_tower_cache

    with pytest.raises(ValueError, match="unknown text tower 'bert'; known: bigru, frozen, hf"):
        ImageTextFeatureParams(text_tower="bert:base")
    with pytest.raises(ValueError, match="must look like 'family:argument'"):
        ImageTextFeatureParams(text_tower="bigru")
    with pytest.raises(LangdmlError, match="the width must be a positive integer"):
        word_vectors("random:abc", ["a"])
    with pytest.raises(LangdmlError, match=r"lacks text_tower\.json; re-run `langdml imagetext-features`"):
        load_tower_cache(tmp_path)
    (tmp_path / "text_tower.json").write_text("{not json")
    with pytest.raises(LangdmlError, match="unreadable"):
        load_tower_cache(tmp_path)
