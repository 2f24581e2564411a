"""Searcher: text, image and combined queries over an index folder; shared by CLI and server.

    from dualsearch.search import Searcher
    s = Searcher.open("my-index")
    for r in s.search("a dog on the beach", k=9):
        print(r.score, r.path)

A combined query adds weighted unit embeddings (texts and images) and subtracts negative terms,
as rclip does, then searches with the normalised sum.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.images import load_image, load_stored
from .data.records import display_name
from .encode.onnx_encoders import load_text_encoder
from .errors import DualsearchError
from .index import ann
from .index.catalog import Catalog
from .index.manifest import ANN_FILE, TEXT_ENCODER_DIR, IndexError_, read_manifest
from .model.folder import model_content_hash
from .storage import atomic_path

log = logging.getLogger(__name__)


class QueryError(DualsearchError):
    """A query that cannot be answered: empty, cancelling out, or naming an id the index lacks."""


@dataclass
class Result:
    path: str
    score: float
    id: int

    def as_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Text queries go through the index's ONNX text encoder when it has one (no torch import);
    the torch model is loaded on first need (image queries, or an index without the encoder)."""

    def __init__(self, folder: Path, manifest: dict, model_path: Path | None, index, catalog: Catalog):
        self.folder = folder
        self.manifest = manifest
        self.model_path = model_path
        self.index = index
        self.catalog = catalog
        self.dim = int(manifest["dim"])
        self.lock = threading.RLock()  # one query at a time: SQLite connection, models
        self._model = None
        self.text_encoder = load_text_encoder(folder / TEXT_ENCODER_DIR, manifest["model"]["hash"])

    @classmethod
    def open(cls, folder: str | os.PathLike, model: str | os.PathLike | None = None) -> "Searcher":
        """Open an index; the model comes from its manifest unless ``model`` is given, and must be
        the one the index was built with (content hash). When that model cannot be read (moved,
        deleted) but the index holds its ONNX text encoder, the index opens for text queries and
        more-like-this by id (image queries then raise :class:`QueryError`). Raises
        :class:`IndexError_`, ``CatalogError``, ``ANNError``."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise IndexError_(f"{folder}: not a dualsearch index (no manifest.json)")
        model_path = Path(model) if model else Path(manifest["model"]["path"])
        try:
            got = model_content_hash(model_path)
        except OSError as e:
            missing = f"{folder}: its model {model_path} cannot be read ({e.strerror or e})"
            if model or load_text_encoder(folder / TEXT_ENCODER_DIR, manifest["model"]["hash"]) is None:
                raise IndexError_(missing) from e
            log.warning("%s; text queries use the index's own text encoder, image queries need the model "
                        "(--model, or re-index with it at its new place)", missing)
            got, model_path = manifest["model"]["hash"], None
        if got != manifest["model"]["hash"]:
            raise IndexError_(f"{folder}: built with model hash {manifest['model']['hash']}, but {model_path} "
                              f"has hash {got}; re-index with this model or open the index with its own")
        index = ann.read(folder / ANN_FILE, manifest["ann"].get("params"))
        if index.d != manifest["dim"]:
            raise IndexError_(f"{folder}: dimension mismatch between index ({index.d}) and manifest "
                              f"({manifest['dim']})")
        return cls(folder, manifest, model_path, index, Catalog(folder, readonly=True))

    @property
    def model(self):
        """The torch dual encoder, loaded on first use."""
        if self._model is None:
            from .model.dual_encoder import DualEncoder

            if self.model_path is None:
                raise QueryError(f"{self.folder}: image queries need the model folder "
                                 f"{self.manifest['model']['path']}, which cannot be read (pass --model, or "
                                 f"re-index with the model at its new place); text queries work")

            with self.lock:
                if self._model is None:
                    self._model = DualEncoder.load(self.model_path)
        return self._model

    @property
    def image_size(self) -> int:
        return self.model.image_tower.image_size

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------ query vectors
    def text_vector(self, text: str) -> np.ndarray:
        if self.text_encoder is not None:
            return self.text_encoder.embed([text])[0]
        return self.model.embed_texts([text])[0]

    def image_vector(self, image) -> np.ndarray:
        """``image``: a path, bytes, or a PIL image."""
        from PIL import Image

        img = image if isinstance(image, Image.Image) else load_image(image, self.model.image_tower.image_size)
        return self.model.embed_images([img])[0]

    def id_vector(self, vector_id: int) -> np.ndarray:
        v = self.catalog.vector_for(vector_id, self.dim)
        if v is None:
            raise QueryError(f"no indexed image with id {vector_id}")
        return v

    def combine(self, texts: Sequence[tuple[str, float]] = (), images: Sequence[tuple[object, float]] = (),
                vectors: Sequence[tuple[np.ndarray, float]] = ()) -> np.ndarray:
        """Weighted sum of unit query embeddings (negative weights push results away), normalised."""
        parts = [w * self.text_vector(t) for t, w in texts]
        parts += [w * self.image_vector(i) for i, w in images]
        parts += [w * v for v, w in vectors]
        if not parts:
            raise QueryError("empty query: give text, an image, or both")
        q = np.sum(parts, axis=0).astype(np.float32)
        norm = np.linalg.norm(q)
        if norm < 1e-8:
            raise QueryError("the query terms cancel out")
        return q / norm

    # ------------------------------------------------------------------ search
    def search_vector(self, q: np.ndarray, k: int = 9, exclude: Sequence[int] = ()) -> list[Result]:
        """The ``k`` nearest indexed images to the unit query vector ``q [D]``, best first, leaving out
        the ids in ``exclude``. ``k`` below 1 counts as 1; above the index size it is clamped to it
        (plus the exclusions), so a huge ``k`` costs no more than the whole index: at most
        ``len(self)`` results, none from an empty index. Raises :class:`QueryError` when ``k`` is
        not a whole number."""
        try:
            k = max(1, int(k))
        except (TypeError, ValueError, OverflowError):  # None, "ten", NaN, inf
            raise QueryError(f"k must be a whole number, got {k!r}") from None
        fetch = min(k + len(exclude), len(self))
        if fetch <= 0:
            return []
        scores, ids = self.index.search(q.reshape(1, -1).astype(np.float32), fetch)
        paths = self.catalog.paths_for(ids[0])
        skip = set(exclude)
        out = [Result(paths[i], float(s), int(i)) for s, i in zip(scores[0], ids[0])
               if i >= 0 and i in paths and i not in skip]
        return out[:k]

    def search(self, text: str | None = None, k: int = 9, image=None, image_weight: float = 1.0,
               add: Sequence[str] = (), subtract: Sequence[str] = (), like_id: int | None = None) -> list[Result]:
        """Text and/or image query, plus extra positive (``add``) and negative (``subtract``) texts,
        and/or an indexed image's id (more like this). At most ``min(k, len(self))`` results, best
        first (see :meth:`search_vector`). Safe to call from several threads. Raises
        :class:`QueryError` for an empty or self-cancelling query."""
        with self.lock:
            return self._search(text, k, image, image_weight, add, subtract, like_id)

    def path_for(self, vector_id: int) -> str | None:
        with self.lock:
            return self.catalog.path_for(vector_id)

    def _search(self, text, k, image, image_weight, add, subtract, like_id) -> list[Result]:
        texts = ([(text, 1.0)] if text else []) + [(t, 1.0) for t in add] + [(t, -1.0) for t in subtract]
        images = [(image, image_weight)] if image is not None else []
        vectors = [(self.id_vector(like_id), 1.0)] if like_id is not None else []
        q = self.combine(texts, images, vectors)
        return self.search_vector(q, k, exclude=[like_id] if like_id is not None else [])

    def close(self) -> None:
        self.catalog.close()


def save_grid(results: Sequence[Result], out: str | os.PathLike, title: str = "", cols: int = 3,
              thumb: int = 256) -> Path:
    """The reference's figure: the top results in a grid, each with its rank and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3.2 + (0.4 if title else 0)), dpi=100)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (rank, r) in zip(axes, enumerate(results, 1)):
        try:
            img = load_stored(r.path, target_size=thumb)
            img.thumbnail((thumb, thumb))
            ax.imshow(img)
        except Exception as e:  # a file that changed since indexing: say so in the cell
            ax.text(0.5, 0.5, f"unreadable:\n{e}", ha="center", va="center", fontsize=7, wrap=True)
        ax.set_title(f"#{rank}  {r.score:.3f}\n{display_name(Path(r.path.rsplit('::', 1)[-1]).name)}", fontsize=8)
    if title:
        fig.suptitle(display_name(title), fontsize=10)
    height = fig.get_figheight()  # keep the title's band free of the first row's labels, at any row count
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height) if title else None)
    out = Path(out)
    try:
        with atomic_path(out) as tmp:  # a one-line StorageError where it cannot be written
            fig.savefig(tmp, format=(out.suffix.lstrip(".").lower() or "png").replace("jpeg", "jpg"))
    finally:
        plt.close(fig)
    return out
