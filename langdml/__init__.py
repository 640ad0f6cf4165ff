"""``import langdml``: the trained model as a library. The code lives in the ``stages`` package (the DVC
stages and their library, ``stages.core``); this name is its stable face.

    import langdml
    retriever = langdml.Retriever.load()             # data/model + data/index (run `dvc repro` first)
    vectors = retriever.embed(["query.png"])
    scores, rows = retriever.search(vectors, k=5)

``TextRetriever.load(...)`` does the same for captions against the image-text model's index. Every problem a
caller can fix (a missing or inconsistent index, a bad device, k outside 1..N, a query of another width or with
NaN) raises ``langdml.LangdmlError`` with a one-line message.
"""

from stages.core.errors import LangdmlError
from stages.core.serving.api import Retriever
from stages.core.serving.text import TextRetriever

__all__ = ["LangdmlError", "Retriever", "TextRetriever"]
