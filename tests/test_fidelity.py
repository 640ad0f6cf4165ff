"""The official runs' quirks behind switches (issue: fidelity round three), each against an independent
reading of the official code (kdwonn/DivE, ExplainableML/LanguageGuidance_for_DML) or a hand computation."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.errors import LangdmlError
from stages.core.model.heads import DivEHead, SlotCrossAttention, SlotOptions, sine_positions


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 slots x 8 wide, inputs of lengths 5, 2 and 3 padded to 5 (zeros where padded, True in the mask)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(3, 3, 8, generator=g)
    inputs = torch.randn(3, 5, 8, generator=g)
    mask = torch.arange(5)[None, :] >= torch.tensor([5, 2, 3])[:, None]
    return slots, inputs.masked_fill(mask[..., None], 0.0), mask


def _official_attention(att: SlotCrossAttention, slots: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor):
    """agg_block/attention.py Attention.forward (PreNorm applied first), written from the file: heads folded into
    the batch, -max where masked, softmax over dim 1 (the queries = slots), renormalised over the keys + 1e-7."""
    h = att.heads
    q = att.to_q(att.norm_slots(slots))
    ctx = att.norm_inputs(inputs)
    k, v = att.to_k(ctx), att.to_v(ctx)

    def fold(t: torch.Tensor) -> torch.Tensor:  # 'b n (h d) -> (b h) n d'
        b, n, hd = t.shape
        return t.view(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)

    q, k, v = fold(q), fold(k), fold(v)
    sim = torch.einsum("bid,bjd->bij", q, k) * att.scale
    big_mask = mask.repeat_interleave(h, dim=0)[:, None, :]  # 'b j -> (b h) () j'
    sim = sim.masked_fill(big_mask, -torch.finfo(sim.dtype).max)
    attn = sim.softmax(dim=1)
    attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-7)
    out = torch.einsum("bij,bjd->bid", attn, v)
    b = slots.shape[0]
    out = out.view(b, h, out.shape[1], out.shape[2]).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
    return att.to_out(out)


def test_official_padding_is_the_official_attention_on_a_padded_batch() -> None:
    torch.manual_seed(0)
    att = SlotCrossAttention(8, heads=2, padding="official").eval()
    slots, inputs, mask = _padded_batch()
    ours, _ = att(slots, inputs, mask)
    torch.testing.assert_close(ours, _official_attention(att, slots, inputs, mask), atol=1e-6, rtol=1e-6)
    exact = SlotCrossAttention(8, heads=2, padding="exact").eval()
    exact.load_state_dict(att.state_dict())
    assert not torch.allclose(exact(slots, inputs, mask)[0][1:], ours[1:], atol=1e-4)  # padded rows differ
    torch.testing.assert_close(exact(slots, inputs, mask)[0][0], ours[0])  # the unpadded row does not


def _official_positions(x: torch.Tensor) -> torch.Tensor:
    """agg_block/pos_encoding.py PositionEmbeddingSine1D(dim, normalize=True).forward, from the file."""
    dim = x.shape[-1]
    y = torch.ones(x.shape[:-1]).cumsum(1)
    y = y / (y[:, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(dim) // 2) / dim)
    pos = y[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=3).flatten(2)


def test_official_positions_run_over_the_padded_batch_length() -> None:
    _, inputs, mask = _padded_batch()
    torch.testing.assert_close(sine_positions(mask, 8, "official"), _official_positions(inputs), atol=1e-6, rtol=0)
    exact = sine_positions(mask, 8, "exact")
    torch.testing.assert_close(exact[1, :2], sine_positions(torch.zeros(1, 2, dtype=torch.bool), 8)[0])
    assert (exact[1, 2:] == 0).all()


@pytest.mark.parametrize("padding", ["exact", "official"])
def test_a_caption_alone_and_in_a_padded_batch(padding: str) -> None:
    """Exact: a set embeds the same alone or padded beside a longer one; official: it does not (its padded
    tokens keep 1/K of every slot and its positions stretch over the batch), as the official formula says."""
    torch.manual_seed(0)
    head = DivEHead(8, 8, slots=3, depth=2, heads=2, options=SlotOptions(key_positions=True, padding=padding)).eval()
    _, inputs, mask = _padded_batch(1)
    with torch.no_grad():
        batch = head.forward_tokens(inputs, mask)["embeddings"][1]
        alone = head.forward_tokens(inputs[1:2, :2], mask[1:2, :2])["embeddings"][0]
    if padding == "exact":
        torch.testing.assert_close(batch, alone, atol=1e-6, rtol=1e-6)
    else:
        assert (batch - alone).abs().max() > 1e-3


def test_a_separate_global_projection_differs_in_training_only() -> None:
    """DivE's spm_fc runs twice: with dropout, the global feature comes from another mask; at evaluation the two
    passes are one."""
    heads = {}
    for separate in (False, True):
        torch.manual_seed(0)
        options = SlotOptions(local_dropout=0.5, local_bn=True, separate_global=separate)
        heads[separate] = DivEHead(6, 8, slots=2, depth=1, heads=2, options=options)
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    outs = {}
    for mode in ("eval", "train"):  # eval first: training updates the BatchNorm statistics (twice when separate)
        for separate, head in heads.items():
            getattr(head, mode)()
            torch.manual_seed(3)
            outs[mode, separate] = head.forward_tokens(x)["embeddings"]
    assert not torch.allclose(outs["train", False], outs["train", True])
    torch.testing.assert_close(outs["eval", False], outs["eval", True])


def test_nltk_tokens_and_the_official_vocabulary_rule() -> None:
    from stages.core.imagetext.vocabulary import UNK, WordRules, build_vocabulary, caption_words, mask_id

    assert caption_words("A man isn't riding, okay.", "nltk") == ["a", "man", "is", "n't", "riding", ",", "okay", "."]
    assert caption_words("A man isn't riding, okay.") == ["a", "man", "isn't", "riding", "okay"]
    texts = ["a dog runs .", "a cat runs", "a dog sleeps", "the dog"]
    rule = WordRules(tokenizer="nltk", vocabulary="official", min_word_count=2)
    # by hand: counts a 3, dog 3, runs 2, . 1, cat 1, sleeps 1, the 1; kept in first-seen order, no <mask>
    vocab = build_vocabulary(texts, rule)
    assert vocab == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"]
    assert mask_id(vocab) == UNK  # the official vocab('<mask>') is <unk>
    ranked = build_vocabulary(texts)
    assert ranked[:5] == ["<pad>", "<start>", "<end>", "<unk>", "<mask>"] and mask_id(ranked) == 4
    assert ranked[5:8] == ["a", "dog", "runs"]  # by count, ties alphabetical


class Vocabulary:  # the official vocab.py class, as its pickles name it (module __main__ there)
    def __init__(self, words: list[str]) -> None:
        self.word2idx = {w: i for i, w in enumerate(words)}
        self.idx2word = {str(i): w for i, w in enumerate(words)}
        self.idx = len(words)


def test_an_official_vocabulary_file_is_read_without_running_its_code(tmp_path: Path) -> None:
    from stages.core.imagetext.vocabulary import WordRules, build_vocabulary, read_vocabulary_file

    words = ["<pad>", "<start>", "<end>", "<unk>", "man", "."]
    pkl = tmp_path / "coco_butd_vocab.pkl"
    pkl.write_bytes(pickle.dumps(Vocabulary(words), protocol=4))
    assert read_vocabulary_file(pkl) == words
    assert build_vocabulary(["ignored"], WordRules(vocabulary_file=str(pkl))) == words
    js = tmp_path / "vocab.json"
    js.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)}}))
    assert read_vocabulary_file(js) == words

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LangdmlError, match=r"evil\.pkl is unreadable \(builtins\.print is not part of a vocabulary\)"):
        read_vocabulary_file(bad)
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 5}}))
    with pytest.raises(LangdmlError, match=r"rows must run 0\.\.4"):
        read_vocabulary_file(gap)


def test_the_official_plg_transform_pads_a_299_crop_of_a_256_resize_with_zeros() -> None:
    from PIL import Image

    from stages.core.language.imagenet import official_transform

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = official_transform(299, mean, std)(Image.new("RGB", (512, 256), (255, 255, 255)))
    assert x.shape == (3, 299, 299)
    # 256 x 512 -> centre crop 299 x 299: 21 px of zero padding above (floor of 43 / 2), 22 below, none sideways
    zero = (-torch.tensor(mean) / torch.tensor(std))[:, None]
    torch.testing.assert_close(x[:, :21, 150], zero.expand(3, 21))
    torch.testing.assert_close(x[:, 21, 150], (1 - torch.tensor(mean)) / torch.tensor(std))
    torch.testing.assert_close(x[:, 277:, 150], zero.expand(3, 22))


def test_a_scaled_step_is_the_plain_step() -> None:
    """float16 training's GradScaler (kdwonn/DivE train.py): scaled backward, unscale, clip, step; on finite
    gradients the update is the unscaled step's."""
    from stages.core.training.fit import TrainStep

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
            self.weights = {"mse": 1.0}
            self.gradient_scales: dict[str, float] = {}

        def inputs(self, batch, device):
            return batch

        def forward(self, x, y):
            return {"mse": torch.nn.functional.mse_loss(self.layer(x), y)}

    batch = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.ones(4, 2))
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        toy = Toy()
        step = TrainStep(toy, torch.optim.SGD(toy.parameters(), lr=0.5), torch.device("cpu"), clip=0.1, scaler=scaler)
        step(batch)
        weights.append(toy.layer.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


def test_s2sd_heads_take_the_s2sd_weight_decay() -> None:
    from fixtures_training import tiny_params

    from stages.core.dml.objective import DMLObjective
    from stages.core.dml.s2sd import S2SD
    from stages.core.model.encoder import build_model

    params = tiny_params()
    model = build_model(params.model)
    s2sd = S2SD(model.channels, [8], lambda dim: torch.nn.Identity(), feat_distill=False)
    from stages.core.dml.losses import build_dml_loss

    loss = build_dml_loss("multisimilarity", 4, 16)
    groups = DMLObjective(
        model,
        loss,
        [],
        omega=0.0,
        language_kwargs={},
        image_similarity=model.similarity,
        s2sd=s2sd,
        s2sd_weight_decay=0.0,
    ).param_groups()
    assert [g.get("weight_decay") for g in groups if g["name"] == "s2sd"] == [0.0]
    plain = DMLObjective(model, loss, [], omega=0.0, language_kwargs={}, image_similarity=model.similarity, s2sd=s2sd)
    assert "weight_decay" not in next(g for g in plain.param_groups() if g["name"] == "s2sd")


def test_the_recipes_turn_the_official_switches_on() -> None:
    from stages.core.recipe import load_recipe

    plg = load_recipe("roth22/cub200-rn512-ms-plg").params
    assert (plg["pseudo_labels.image_size"], plg["pseudo_labels.transform"]) == (299, "official")
    assert plg["evaluate.precision"] == "float32"
    assert load_recipe("roth22/cub200-rn512-s2sd-ms-plg").params["train.s2sd.weight_decay"] == 0.0
    dive = load_recipe("dive/coco-butd-bigru").params
    assert dive["imagetext.model.padding"] == "official"
    assert dive["imagetext.model.image_global_projection"] == "separate"
    assert (dive["imagetext.features.tokenizer"], dive["imagetext.features.vocabulary"]) == ("nltk", "official")
    assert dive["imagetext.train.amp_dtype"] == "float16"
    np.testing.assert_equal(dive["imagetext.features.min_word_count"], 4)
