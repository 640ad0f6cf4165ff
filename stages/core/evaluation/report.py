"""Evaluation pictures (matplotlib, Agg): the retrieval gallery and the class-similarity heat maps.

``gallery_figure`` and ``similarity_figure`` compose them from embeddings, a manifest and the
language cache; ``plot_gallery`` and ``plot_similarity`` draw arrays and labels into a PNG.

Figures have a fixed size and are saved without ``bbox_inches="tight"``, so a picture's pixel
size depends only on its layout (what the tests check), and are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
GALLERY_CELL = (1.6, 2.3)  # inches per image cell: the image plus up to four lines of class name
GALLERY_NAME_WIDTH = 20  # characters per line of a class name under an image
CORRECT_COLOUR = "#1a9641"
NEUTRAL_COLOUR = "black"
WRONG_COLOUR = "#d7191c"
SIMILARITY_FIGSIZE = (14.0, 6.5)  # one row of two maps; with a named excerpt below, twice as high
MAX_TICK_LABELS = 40  # more classes than this: the full maps are unnamed and a 40-class excerpt is named
GALLERY_NEIGHBOURS = 5
THUMBNAIL = 96  # pixels; gallery images are shown small
MAX_SIMILARITY_CLASSES = 2000  # beyond this a seeded sample of classes (the ordering is quadratic)


@dataclass(frozen=True)
class GalleryRow:
    """One query and its nearest neighbours, best first; images are H x W x 3 uint8 arrays."""

    query: np.ndarray
    query_name: str
    neighbours: Sequence[np.ndarray]
    neighbour_names: Sequence[str]
    correct: Sequence[bool | None]  # None: not known (a search's unlabelled query)


def pick_gallery_queries(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` row indices spread over the classes: a seeded class order, one image per class per round.

    Classes with a single image are used last, since they have no correct neighbour to show.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    order = rng.permutation(len(classes))
    order = order[np.argsort(counts[order] < 2, kind="stable")][:n]  # a round uses at most n classes
    pools = [list(rng.permutation(np.flatnonzero(labels == classes[c]))) for c in order]
    picked: list[int] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(int(pool.pop()))
    return np.asarray(picked, dtype=np.int64)


def gallery_size(n_rows: int, n_neighbours: int) -> tuple[int, int]:
    """Pixel (width, height) of a gallery with ``n_rows`` queries and ``n_neighbours`` per row."""
    return round((n_neighbours + 1) * GALLERY_CELL[0] * DPI), round(n_rows * GALLERY_CELL[1] * DPI)


def similarity_size(n_classes: int = 0) -> tuple[int, int]:
    """Pixel (width, height) of the similarity picture of ``n_classes`` classes."""
    rows = 1 if n_classes <= MAX_TICK_LABELS else 2
    return round(SIMILARITY_FIGSIZE[0] * DPI), round(rows * SIMILARITY_FIGSIZE[1] * DPI)


def _verdict(ok: bool | None) -> str:
    """Green for a right result, red for a wrong one, black where nobody knows (a search of unlabelled queries)."""
    return NEUTRAL_COLOUR if ok is None else CORRECT_COLOUR if ok else WRONG_COLOUR


def _figure(figsize: tuple[float, float]) -> Figure:
    # The object-oriented API with no pyplot: no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _wrapped(name: str, width: int = GALLERY_NAME_WIDTH, lines: int = 3) -> str:
    """The whole name on up to ``lines`` lines (a longer one ends in an ellipsis)."""
    import textwrap

    return "\n".join(textwrap.wrap(name, width, max_lines=lines, placeholder="…", break_on_hyphens=False))


def plot_gallery(rows: Sequence[GalleryRow], path: str | os.PathLike[str]) -> Path:
    """Queries (first column) with their nearest neighbours; correct neighbours framed green, wrong red."""
    if not rows:
        raise ValueError("a gallery needs at least one query")
    n_cols = 1 + max(len(r.neighbours) for r in rows)
    fig = _figure((n_cols * GALLERY_CELL[0], len(rows) * GALLERY_CELL[1]))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, row in enumerate(rows):
        cells = [(row.query, f"query\n{_wrapped(row.query_name)}", "black", 1.0)]
        found = zip(row.neighbours, row.neighbour_names, row.correct, strict=True)
        cells += [
            (img, _wrapped(f"{i + 1}. {name}", lines=4), _verdict(ok), 4.0) for i, (img, name, ok) in enumerate(found)
        ]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.set_axis_off()
                continue
            img, text, colour, width = cells[c]
            ax.imshow(np.asarray(img), interpolation="nearest")
            ax.set_xlabel(text, fontsize=8, color=colour if c else "black", labelpad=2)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
    return _save(fig, path)


def language_order(sim: np.ndarray) -> np.ndarray:
    """A class order that puts similar classes next to each other: the leaf order of average-linkage
    clustering on 1 - similarity, so blocks of related classes show as squares on the diagonal."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(sim) < 3:
        return np.arange(len(sim))
    dist = np.clip(1.0 - (sim + sim.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def _heat_pair(
    fig: Figure, axes: Sequence[Any], maps: Sequence[np.ndarray], names: Sequence[str] | None, what: str
) -> None:
    titles = ("language similarity (class names)", "image similarity (class centroids)")
    if names is None or what:
        titles = ("language similarity", "image similarity (centroids)")
    for ax, sim, title in zip(axes, maps, titles, strict=True):
        im = ax.imshow(sim, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
        ax.set_title(f"{title}{what}", fontsize=10)
        ax.set_xlabel("test class")
        ax.set_ylabel("test class")
        if names is not None:
            ax.set_xticks(range(len(names)), [_short(c, 24) for c in names], rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), [_short(c, 24) for c in names], fontsize=6)


def plot_similarity(
    language_sim: np.ndarray,
    image_sim: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    seed: int = 0,
) -> Path:
    """The language similarity of the classes beside the learned image similarity, in the same class order.

    Up to :data:`MAX_TICK_LABELS` classes: both maps with names. More: classes ordered by language
    similarity (:func:`language_order`) and shown unnamed, and below them a named excerpt of
    :data:`MAX_TICK_LABELS` neighbours in that order (from a seeded start), where names can be read.
    """
    n = len(class_names)
    if language_sim.shape != (n, n) or image_sim.shape != (n, n):
        raise ValueError(
            f"similarity matrices must be {n} x {n} (one row per class), got {language_sim.shape} and {image_sim.shape}"
        )
    if n <= MAX_TICK_LABELS:
        fig = _figure(SIMILARITY_FIGSIZE)
        _heat_pair(fig, fig.subplots(1, 2), (language_sim, image_sim), class_names, "")
        return _save(fig, path)
    order = language_order(language_sim)
    fig = _figure((SIMILARITY_FIGSIZE[0], 2 * SIMILARITY_FIGSIZE[1]))
    axes = fig.subplots(2, 2)
    full = [m[np.ix_(order, order)] for m in (language_sim, image_sim)]
    _heat_pair(fig, axes[0], full, None, f": {n} classes in language order")
    start = int(np.random.default_rng(seed).integers(0, n - MAX_TICK_LABELS + 1))
    window = order[start : start + MAX_TICK_LABELS]
    part = [m[np.ix_(window, window)] for m in (language_sim, image_sim)]
    names = [str(class_names[i]) for i in window]
    _heat_pair(fig, axes[1], part, names, f": classes {start + 1}-{start + MAX_TICK_LABELS}")
    return _save(fig, path)


def thumbnail(image: Any) -> np.ndarray:
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def gallery_figure(
    emb: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    images: Any,
    path: str | os.PathLike[str],
    *,
    n_queries: int,
    seed: int,
    neighbours: Any = None,
) -> np.ndarray:
    """``n_queries`` seeded test queries with their nearest neighbours; ``images[i]`` is ``(PIL image, label)``.
    Returns the query rows shown.

    ``neighbours(emb, query_ids, k)`` finds them (default: exact cosine search, N x D embeddings; pass
    a set search for N x K x D).
    """
    from stages.core.evaluation.search import nearest_neighbours

    find = neighbours or nearest_neighbours
    queries = pick_gallery_queries(labels, n_queries, seed)
    found = find(emb, queries, GALLERY_NEIGHBOURS)
    rows = [
        GalleryRow(
            query=thumbnail(images[q][0]),
            query_name=str(names[q]),
            neighbours=[thumbnail(images[j][0]) for j in nb],
            neighbour_names=[str(names[j]) for j in nb],
            correct=list(labels[nb] == labels[q]),
        )
        for q, nb in zip(queries, found, strict=True)
    ]
    plot_gallery(rows, path)
    return queries


def similarity_figure(
    emb: np.ndarray,
    labels: np.ndarray,
    language: tuple[np.ndarray, np.ndarray, list[str]],
    path: str | os.PathLike[str],
    seed: int = 0,
) -> str | None:
    """Language vs learned image similarity of the test classes (a seeded sample of
    :data:`MAX_SIMILARITY_CLASSES` when there are more).

    ``emb``: one unit vector per image (a set's: ``SimilaritySpec.single_vectors``); ``language`` is (class
    ids, C x D class embeddings, class names) of the ELG cache. Returns why the picture was not drawn, or
    None when it was.
    """
    from stages.core.evaluation.metrics import class_centroids, cosine_similarity_matrix

    classes = np.unique(labels)
    if len(classes) > MAX_SIMILARITY_CLASSES:
        pick = np.random.default_rng(seed).choice(len(classes), MAX_SIMILARITY_CLASSES, replace=False)
        classes = classes[np.sort(pick)]
    ids, vectors, class_names = language
    pos = {int(c): i for i, c in enumerate(np.asarray(ids).tolist())}
    missing = [int(c) for c in classes if int(c) not in pos]
    if missing:
        return f"{len(missing)} test classes (e.g. {missing[0]}) have no language embedding"
    rows = [pos[int(c)] for c in classes]
    lang_sim = cosine_similarity_matrix(vectors[rows])
    image_sim = cosine_similarity_matrix(class_centroids(emb, labels, classes))
    plot_similarity(lang_sim, image_sim, [str(class_names[r]) for r in rows], path, seed=seed)
    return None


SLOT_CELL = 1.6  # inches per picture in slots.png


def slot_size(n_rows: int, n_maps: int) -> tuple[int, int]:
    """Pixel (width, height) of a slot picture with ``n_rows`` images and ``n_maps`` maps per image."""
    return round((n_maps + 1) * SLOT_CELL * DPI), round(n_rows * (SLOT_CELL + 0.3) * DPI)


def plot_slots(
    images: Sequence[np.ndarray],
    maps: np.ndarray,
    titles: Sequence[str],
    names: Sequence[str],
    path: str | os.PathLike[str],
) -> Path:
    """Each image (H x W x 3 uint8) beside its maps (n x M x h x w, e.g. one attention map per slot),
    each map upsampled onto the image as a heat map; ``titles`` names the M columns."""
    from PIL import Image

    if len(images) == 0 or maps.shape[0] != len(images) or maps.shape[1] != len(titles):
        raise ValueError(f"need one M x h x w stack per image and M titles, got {maps.shape} for {len(images)}")
    n, m = maps.shape[:2]
    fig = _figure((SLOT_CELL * (m + 1), (SLOT_CELL + 0.3) * n))
    axes = fig.subplots(n, m + 1, squeeze=False)
    for r, (img, name) in enumerate(zip(images, names, strict=True)):
        h, w = img.shape[:2]
        axes[r, 0].imshow(img)
        axes[r, 0].set_xlabel(_short(name), fontsize=8)
        for c in range(m):
            a = maps[r, c].astype(np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            heat = np.asarray(Image.fromarray((255 * a).astype(np.uint8)).resize((w, h), Image.BILINEAR))
            axes[r, c + 1].imshow(img)
            axes[r, c + 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=255)
            if r == 0:
                axes[r, c + 1].set_title(titles[c], fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def plot_imagetext(
    image_rows: Sequence[tuple[np.ndarray, Sequence[str], Sequence[bool]]],
    caption_rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[bool]]],
    path: str | os.PathLike[str],
) -> Path:
    """Image queries with their best captions (text, green if the image's own) above caption queries with
    their best images (framed green if the caption's image, red if not)."""
    n_cols = 1 + max([len(r[1]) for r in image_rows] + [len(r[1]) for r in caption_rows] + [1])
    n_rows = len(image_rows) + len(caption_rows)
    if n_rows == 0:
        raise ValueError("a retrieval picture needs at least one query")
    fig = _figure((n_cols * GALLERY_CELL[0], n_rows * GALLERY_CELL[1]))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, (image, texts, correct) in enumerate(image_rows):
        axes[r, 0].imshow(image, interpolation="nearest")
        axes[r, 0].set_xlabel("image query", fontsize=8)
        for c, (text, ok) in enumerate(zip(texts, correct, strict=True), start=1):
            ax = axes[r, c]
            ax.set_axis_off()
            colour = _verdict(ok)
            ax.text(0.5, 0.5, _wrapped(f"{c}. {text}", lines=5), ha="center", va="center", fontsize=8, color=colour)
    for r, (text, images, correct) in enumerate(caption_rows, start=len(image_rows)):
        axes[r, 0].set_axis_off()
        axes[r, 0].text(0.5, 0.5, _wrapped(f"caption query: {text}", lines=5), ha="center", va="center", fontsize=8)
        for c, (image, ok) in enumerate(zip(images, correct, strict=True), start=1):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_edgecolor(_verdict(ok))
                spine.set_linewidth(4.0)
    return _save(fig, path)
