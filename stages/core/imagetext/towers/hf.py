"""``hf:<model>``: a Hugging Face transformer fine-tuned under the set head (the paper's BERT rows), over
its tokenizer's ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.core.imagetext.towers import TEXT_TOWERS, CaptionCache, HeadFactory, TextTower, Tokenizer, TowerKind

HF_HINT = "text_tower bigru:glove:6B-50d and frozen:sentence-transformers:all-MiniLM-L6-v2 work offline"


class HFTower(nn.Module):
    """A transformer's token states, projected to ``embed_dim``; the first token's state is the global
    feature (``txt_pooling cls``)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.linear = nn.Linear(encoder.config.hidden_size, embed_dim)
        self.head = head
        self.similarity = head.similarity

    def set_module(self) -> list[nn.Parameter]:
        return self.head.set_module()

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        attention = torch.ones_like(ids) if mask is None else (~mask).long()
        local = self.linear(self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state)
        return self.head.forward_tokens(local, mask, local[:, 0])


def _encoder(tok: Any, max_tokens: int) -> Tokenizer:
    """Captions -> a Hugging Face tokenizer's ids (special tokens included, at most ``max_tokens``)."""

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(row, dtype=np.int32) for row in tok(texts, truncation=True, max_length=max_tokens)["input_ids"]
        ]

    return encode


class _HF(TowerKind):
    @staticmethod
    def _load(name: str, load: Callable[[], Any]) -> Any:
        """``load()`` from a local folder, or from the hub's cache / the hub (one line when neither works)."""
        from stages.core.hub import load_cached_or_online, load_local

        what = f"text tower hf:{name}"
        return load_local(what, load) if Path(name).exists() else load_cached_or_online(what, load, HF_HINT)

    def _tokenizer(self, name: str) -> Any:
        from transformers import AutoTokenizer

        return self._load(name, lambda: AutoTokenizer.from_pretrained(name))

    def cache(
        self, arg: str, texts: list[str], train: np.ndarray, max_tokens: int, device: Any, words: Any = None
    ) -> CaptionCache:
        from transformers import AutoConfig

        tok = self._tokenizer(arg)
        config = self._load(arg, lambda: AutoConfig.from_pretrained(arg))
        details = {"config": config.to_dict()}
        tower = TextTower(f"hf:{arg}", max_tokens, int(config.vocab_size), tok.mask_token_id, details)
        return CaptionCache(_encoder(tok, max_tokens)(texts), tower)

    def tokenizer(self, tower: TextTower, device: Any) -> Tokenizer:
        return _encoder(self._tokenizer(tower.arg), tower.max_tokens)

    def build(self, tower: TextTower, head: HeadFactory, embed_dim: int, dropout: float) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        config = dict(tower.details["config"])
        config_obj = AutoConfig.for_model(config.pop("model_type"), **config)
        return HFTower(AutoModel.from_config(config_obj), embed_dim, head(embed_dim, project=False))

    def initialise(self, module: nn.Module, tower: TextTower, arrays: dict[str, np.ndarray]) -> None:
        from transformers import AutoModel

        name = tower.arg
        module.encoder.load_state_dict(self._load(name, lambda: AutoModel.from_pretrained(name)).state_dict())


TEXT_TOWERS.register("hf")(_HF())
