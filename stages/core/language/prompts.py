"""Class names into prompts into one unit vector per class (ELG, and the PLG names).

Dataset class names come as folder names ("001.Black_footed_Albatross", "T-shirt/top"), so they
are cleaned before they fill "a photo of a {}"; several templates are averaged (the CLIP
prompt-ensembling recipe) and re-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from stages.core.errors import LangdmlError
from stages.core.vectors import l2_normalize

if TYPE_CHECKING:
    from stages.core.language.encoders import TextEncoder

NAME_ONLY = "{}"


def clean_class_name(name: str | None) -> str:
    """Underscores become spaces and runs of whitespace one space; an empty name is an error."""
    cleaned = " ".join((name or "").replace("_", " ").split())
    if not cleaned:
        raise LangdmlError(f"class name {name!r} is empty after cleaning; give every class a name and re-run prepare")
    return cleaned


def fill_template(template: str, name: str) -> str:
    """``template`` with its one ``{}`` replaced by ``name`` (other braces are left alone)."""
    if template.count("{}") != 1:
        raise LangdmlError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    return template.replace("{}", name)


def average_templates(embeddings: np.ndarray, n_templates: int) -> np.ndarray:
    """(C * T) x D rows, T consecutive rows per class, into C x D unit vectors (mean, then L2)."""

    emb = np.asarray(embeddings, dtype=np.float64)
    if n_templates < 1 or emb.ndim != 2 or emb.shape[0] % n_templates:
        raise ValueError(f"{emb.shape} embeddings are not a whole number of {n_templates}-template groups")
    return l2_normalize(emb.reshape(-1, n_templates, emb.shape[1]).mean(axis=1))


def embed_names(
    encoder: TextEncoder, names: Sequence[str], templates: Sequence[str], batch_size: int = 64
) -> tuple[list[str], np.ndarray, list[str]]:
    """(prompt text per name, N x D unit vectors, templates actually used).

    ``names`` are cleaned already. An encoder of bare names (``uses_template`` False, e.g. GloVe)
    gets the name alone and the templates used are ``["{}"]``; otherwise each name fills every
    template, and a class's prompt text lists them joined by " | ".
    """
    used = list(templates) if encoder.uses_template else [NAME_ONLY]
    if not used:
        raise LangdmlError("no prompt templates given; set at least one, e.g. 'a photo of a {}'")
    texts = [fill_template(t, n) for n in names for t in used]
    matrix = average_templates(encoder.encode(texts, batch_size), len(used))
    prompts = [" | ".join(texts[i * len(used) : (i + 1) * len(used)]) for i in range(len(names))]
    return prompts, matrix, used
