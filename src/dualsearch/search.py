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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.images import load_image, load_stored
from .data.records import display_name
from .encode.batching import MicroBatcher
from .encode.onnx_encoders import load_text_encoder
from .errors import DualsearchError
from .index import ann, qbnorm
from .index.catalog import Catalog, PhotoFilter
from .index.manifest import ANN_FILE, TEXT_ENCODER_DIR, IndexError_, read_manifest
from .index.photos import load_calibration, query_z
from .model.folder import model_content_hash
from .storage import atomic_path

log = logging.getLogger(__name__)


class QueryError(DualsearchError):
    """A query that cannot be answered: empty, cancelling out, or naming an id the index lacks."""


@dataclass
class Result:
    """One hit. ``score``: inner product of unit vectors (cosine); ``z``: how far it stands above
    its query's score distribution over the gallery (:mod:`dualsearch.index.photos`); ``weak``:
    below the index's calibrated floor (None when the index has no calibration); ``duplicates``:
    how many near-identical images it stands for (``collapse``); ``meta``: the photo's catalog
    metadata (``taken``, ``date_source``, ``width``, ``height``, ``format``, ``camera_make``,
    ``camera_model``, ``lat``, ``lon``), empty for an index that predates it."""

    path: str
    score: float
    id: int
    weak: bool | None = None
    z: float | None = None
    duplicates: int = 1
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Page:
    """One page of results: ``results`` (best first, or newest first when sorted by date),
    ``total`` (how many results one can page through with ``offset``), ``offset``; ``ranked``
    is False for a timeline (no query, so no scores)."""

    results: list[Result]
    total: int
    offset: int = 0
    ranked: bool = True  # False for a timeline (no query: no scores)


SORTS = ("score", "date")
PAGE_WINDOW = 1000  # results are ranked in windows of this many, so pages inside one are stable
DATE_CANDIDATES = 1000  # sort=date orders the best this-many matches above the floor by date


class Searcher:
    """Text queries go through the index's ONNX text encoder when it has one (no torch import);
    the torch model is loaded on first need (image queries, or an index without the encoder).
    Queries run concurrently: each thread reads the catalog through its own read-only SQLite
    connection, ONNX Runtime and FAISS searches release the GIL; only the lazy model load locks."""

    def __init__(self, folder: Path, manifest: dict, model_path: Path | None, index, catalog: Catalog):
        self.folder = folder
        self.manifest = manifest
        self.model_path = model_path
        self.index = index
        self.dim = int(manifest["dim"])
        self.lock = threading.RLock()  # the lazy model load, and the list of connections
        self._model = None
        self._local = threading.local()
        self._local.catalog = catalog
        self._catalog_folder = catalog.path.parent
        self._catalogs = [catalog]
        self.text_encoder = load_text_encoder(folder / TEXT_ENCODER_DIR, manifest["model"]["hash"])
        # concurrent text queries are encoded together (no waiting window: a lone query goes straight through)
        self._text_batcher = (MicroBatcher(lambda texts: self.text_encoder.embed(texts))
                              if self.text_encoder is not None else None)
        self.calibration = load_calibration(folder, manifest)
        self.qbnorm = qbnorm.load(folder, manifest)  # None: rank by cosine alone (per query: qbnorm=False)

    @property
    def catalog(self) -> Catalog:
        """This thread's read-only catalog connection (opened on first use in a thread)."""
        cat = getattr(self._local, "catalog", None)
        if cat is None:
            cat = self._local.catalog = Catalog(self._catalog_folder, readonly=True)
            with self.lock:
                self._catalogs.append(cat)
        return cat

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
        if self._text_batcher is not None:
            return self._text_batcher(text)
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
    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.vectors_for(ids, self.dim)

    def _ranked(self, q: np.ndarray, fetch: int, allowed: np.ndarray | None, skip: set,
                hubness: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``[m]``, scores ``[m]``) of the ``fetch`` best matches, best first, leaving out
        ``skip``; only a page of them becomes :class:`Result` objects (:meth:`_results`). With
        ``hubness`` and the index's hubness correction (:mod:`dualsearch.index.qbnorm`), whole
        blocks of ``RERANK_DEPTH`` are fetched by cosine and re-ranked block by block by cosine
        plus the image's offset; scores stay cosine."""
        corrected = self.qbnorm if hubness else None
        depth = -(-fetch // qbnorm.RERANK_DEPTH) * qbnorm.RERANK_DEPTH if corrected is not None else fetch
        scores, ids = ann.search(self.index, q.reshape(1, -1), depth + len(skip), allowed, vectors=self._vectors)
        keep = (ids[0] >= 0) & ~np.isin(ids[0], list(skip))
        ids, scores = ids[0][keep], np.minimum(scores[0][keep], 1.0)  # codes' rounding can pass 1 (SQ8: 1.0003)
        return (ids, scores) if corrected is None else corrected.rerank(ids, scores, fetch, qbnorm.RERANK_DEPTH)

    def _results(self, q: np.ndarray, ids: np.ndarray, scores: np.ndarray, counts=None) -> list[Result]:
        """Results for ``ids`` with their paths, weak marks and metadata (``counts``: group sizes)."""
        paths = self.catalog.paths_for(ids)
        counts = np.ones(len(ids), np.int64) if counts is None else counts
        out = [Result(paths[i], float(s), int(i), duplicates=int(c)) for i, s, c in zip(ids, scores, counts)
               if i in paths]
        self._mark_weak(q, out)
        self._attach_metadata(out)
        return out

    def _weak_floor(self) -> float:
        return -np.inf if self.calibration is None else self.calibration[2]

    def _mark_weak(self, q: np.ndarray, results: list[Result]) -> None:
        if self.calibration is None or not results:
            return
        mean, cov, score_floor = self.calibration
        z = query_z(q.reshape(1, -1), np.array([[r.score for r in results]]), mean, cov)[0]
        for r, zi in zip(results, z):
            r.z, r.weak = round(float(zi), 3), bool(r.score < score_floor)  # z informs, the score decides

    def search_vector(self, q: np.ndarray, k: int = 9, exclude: Sequence[int] = (), where: PhotoFilter | None = None,
                      offset: int = 0, sort: str = "score", collapse: bool = False, hubness: bool = False) -> Page:
        """A page of the indexed images nearest to the unit query vector ``q [D]`` among those
        that pass ``where``, leaving out the ids in ``exclude``: ``k`` results from ``offset``.
        ``sort="score"``: best first, ``total`` every image that passes; ``sort="date"``: the best
        :data:`DATE_CANDIDATES` matches that are not weak, newest first. ``collapse``: one result
        per group of near-duplicates (:mod:`dualsearch.index.duplicates`), with the group's size
        in ``duplicates``; ``total`` then counts groups among the ranked window. ``k`` below 1 counts as 1;
        pages inside a window of :data:`PAGE_WINDOW` results are stable. ``hubness``: re-rank by the
        index's QB-Norm offsets (for text queries: its bank is of captions). Raises
        :class:`QueryError` for a ``k``/``offset`` that is not a whole number or an unknown sort,
        ``CatalogError`` for a filter on an index without metadata."""
        k, offset = _whole(k, "k", 1), _whole(offset, "offset", 0)
        if sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
        allowed = self.catalog.filter_ids(where) if where else None
        skip = {int(i) for i in exclude}
        passing = (len(allowed) if allowed is not None else len(self)) - len(skip)
        if passing <= 0:
            return Page([], 0, offset)
        if sort == "date":
            ids, scores = self._ranked(q, min(DATE_CANDIDATES, passing), allowed, skip, hubness)
            strong = scores >= self._weak_floor()
            ids, scores = self._by_date(ids[strong], scores[strong])
            total = len(ids)
        else:
            fetch = min(passing, -(-(offset + k) // PAGE_WINDOW) * PAGE_WINDOW)
            (ids, scores), total = self._ranked(q, fetch, allowed, skip, hubness), passing
        counts = None
        if collapse:
            complete = sort == "date" or len(ids) >= passing  # the window held every passing image
            ids, scores, counts = self._collapsed(ids, scores)
            total = len(ids) if complete else total  # else: an upper bound
        window = slice(offset, offset + k)
        return Page(self._results(q, ids[window], scores[window], None if counts is None else counts[window]),
                    total, offset)

    def _collapsed(self, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One (id, score, group size) per group of near-duplicates among the ranked ``ids``
        (:func:`dualsearch.index.duplicates.collapse`)."""
        from .index.duplicates import collapse

        if not len(ids):
            return ids, scores, np.zeros(0, np.int64)
        groups = collapse(ids, scores, self._vectors)
        return (np.array([g.id for g in groups], np.int64), np.array([g.score for g in groups], np.float32),
                np.array([g.count for g in groups], np.int64))

    def _by_date(self, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``ids``, ``scores`` newest first (undated last; ties by score, then id)."""
        dates = self.catalog.dates_for(ids.tolist())
        order = sorted(range(len(ids)), key=lambda j: (dates.get(int(ids[j])) or "", scores[j], -ids[j]),
                       reverse=True)
        return ids[order], scores[order]

    def _attach_metadata(self, results: list[Result]) -> None:
        meta = self.catalog.metadata_for([r.id for r in results])
        for r in results:
            m = dict(meta.get(r.id, {}))
            m.pop("path", None)
            r.meta = m

    def browse(self, where: PhotoFilter | None = None, k: int = 24, offset: int = 0) -> Page:
        """No query: the images that pass ``where``, newest first (a timeline)."""
        k, offset = _whole(k, "k", 1), _whole(offset, "offset", 0)
        ids, total = self.catalog.ids_by_date(where or PhotoFilter(), offset, k)
        paths = self.catalog.paths_for(ids)
        page = [Result(paths[i], 0.0, int(i)) for i in ids if i in paths]
        self._attach_metadata(page)
        return Page(page, total, offset, ranked=False)

    def search_page(self, text: str | None = None, k: int = 9, image=None, image_weight: float = 1.0,
                    add: Sequence[str] = (), subtract: Sequence[str] = (), like_id: int | None = None,
                    where: PhotoFilter | None = None, offset: int = 0, sort: str = "score",
                    collapse: bool = False, qbnorm: bool = True) -> Page:
        """Text and/or image query, plus extra positive (``add``) and negative (``subtract``)
        texts, and/or an indexed image's id (more like this), among the images that pass
        ``where``: one page (see :meth:`search_vector`). With no query at all and
        ``sort="date"``: :meth:`browse`. Safe to call from several threads at once. Raises
        :class:`QueryError` for an empty or self-cancelling query. A query of texts alone is
        ranked with the index's hubness correction when it has one (:mod:`dualsearch.index.qbnorm`) and
        ``qbnorm`` is true (false: by cosine alone)."""
        if not (text or image is not None or add or subtract or like_id is not None) and sort == "date":
            return self.browse(where, k, offset)
        texts = ([(text, 1.0)] if text else []) + [(t, 1.0) for t in add] + [(t, -1.0) for t in subtract]
        images = [(image, image_weight)] if image is not None else []
        vectors = [(self.id_vector(like_id), 1.0)] if like_id is not None else []
        q = self.combine(texts, images, vectors)
        return self.search_vector(q, k, [like_id] if like_id is not None else [], where, offset, sort, collapse,
                                  hubness=qbnorm and bool(texts) and not images and not vectors)

    def search(self, text: str | None = None, k: int = 9, **kwargs) -> list[Result]:
        """:meth:`search_page`'s results (the first ``k`` unless ``offset`` is given)."""
        return self.search_page(text, k, **kwargs).results

    def path_for(self, vector_id: int) -> str | None:
        return self.catalog.path_for(vector_id)

    def info(self) -> dict:
        """What the index holds: counts, date range, folders, cameras, formats, the model, and
        example queries (the model's own or the bank's best matches; see ``index.photos``)."""
        return {**self.catalog.library_summary(), "model": Path(self.manifest["model"]["path"]).name,
                "ann": self.manifest["ann"]["kind"], "examples": self.manifest.get("examples", []),
                "weak_floor": self.calibration is not None, "hubness_correction": self.qbnorm is not None}

    def close(self) -> None:
        if self._text_batcher is not None:
            self._text_batcher.close()
        with self.lock:
            for cat in self._catalogs:
                try:
                    cat.close()
                except Exception:  # a connection owned by a thread that is gone
                    pass
            self._catalogs.clear()


def _whole(value, name: str, least: int) -> int:
    """``value`` as a whole number, at least ``least``; raises :class:`QueryError`."""
    try:
        return max(least, int(value))
    except (TypeError, ValueError, OverflowError):  # None, "ten", NaN, inf
        raise QueryError(f"{name} must be a whole number, got {value!r}") from None


def save_grid(results: Sequence[Result], out: str | os.PathLike, title: str = "", cols: int = 3,
              thumb: int = 256) -> Path:
    """The reference's figure: the top results in a grid, each with its rank and score, written
    to ``out`` (format from its suffix). Raises ``StorageError`` where it cannot be written."""
    import matplotlib.pyplot as plt

    fig = grid_figure(results, title, cols, thumb)
    out = Path(out)
    try:
        with atomic_path(out) as tmp:  # a one-line StorageError where it cannot be written
            fig.savefig(tmp, format=(out.suffix.lstrip(".").lower() or "png").replace("jpeg", "jpg"))
    finally:
        plt.close(fig)
    return out


def grid_figure(results: Sequence[Result], title: str = "", cols: int = 3, thumb: int = 256):
    """The matplotlib figure of :func:`save_grid` (each cell's label clears the row above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3.5 + (0.4 if title else 0)), dpi=100)
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
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height) if title else None, h_pad=1.2)  # labels clear the row above
    return fig
