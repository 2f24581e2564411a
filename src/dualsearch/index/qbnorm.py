"""Hubness correction at search time: query-bank normalisation (QB-Norm with the inverted softmax,
Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022).

Some images ("hubs") sit close to very many captions and crowd the top of unrelated queries.
QB-Norm scores an image ``g`` for a query ``q`` by the inverted softmax over a bank of queries
``B`` (the model's training captions, :data:`dualsearch.model.folder.QUERY_BANK_FILE`)::

    log p(g | q) = beta * s(q, g) - log sum_b exp(beta * s(b, g))

so the ranking of one query orders images by ``s(q, g) + offset(g)`` with the per-image constant
``offset(g) = -logsumexp_b(beta * s(b, g)) / beta`` (cosine units). ``beta`` is the model's own
learned logit scale (its softmax temperature in training). The offsets depend on nothing but
the image's vector and the bank, so they are computed once per image at indexing (``N x B x D``
multiply-adds; 4,096 captions x 256 dims: about 2 GFLOP per 1,000 images) and stored beside the
index in :data:`STATS_FILE` (4 bytes per vector id, memory-mapped at search); each run computes
only the rows added since.

At search the ANN index returns candidates by cosine, and each consecutive block of
:data:`RERANK_DEPTH` of them is re-ranked by ``cosine + offset`` (block by block, so that deeper
pages only append): an approximation of the exact correction, which would re-score the whole
gallery. Results keep their cosine as ``score``.

Measured on held-out recall (``python bench/quality.py --variants "default,default + QB-Norm"``,
3 training seeds, the exact correction over the whole held-out gallery), see BENCHMARKS.md.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..model.folder import ModelError, read_model_config, read_query_bank
from ..storage import atomic_path
from .catalog import Catalog, PhotoFilter

log = logging.getLogger(__name__)

MAX_BETA = 100.0  # CLIP clamps its logit scale at 100
RERANK_DEPTH = 2000  # cosine candidates re-ranked together: a ranking re-orders consecutive blocks of this many
STATS_FILE = "qbnorm.npy"  # float32 offset by vector id
BANK_FILE = "qbnorm_bank.npz"  # the bank's vectors, beta and digest (what the offsets were computed with)
BLOCK = 4096  # images scored against the bank at a time ([B, BLOCK] float32 scores: 64 MiB at B = 4,096)


def offsets(bank: np.ndarray, vectors: np.ndarray, beta: float) -> np.ndarray:
    """Per-image QB-Norm offsets ``[n]`` float32 (cosine units, <= 0) for unit ``vectors [n, D]``
    against unit ``bank [B, D]`` query vectors at inverse temperature ``beta`` (> 0): ``-logsumexp_b
    (beta * bank_b . v) / beta`` (module docstring). ``bank`` with no rows: zeros."""
    if len(bank) == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    out = np.empty(len(vectors), np.float32)
    b = np.asarray(bank, np.float32)
    for s in range(0, len(vectors), BLOCK):
        logits = b @ np.asarray(vectors[s:s + BLOCK], np.float32).T  # [B, n]
        logits *= np.float32(beta)
        top = logits.max(0)
        logits -= top
        np.exp(logits, out=logits)
        out[s:s + BLOCK] = -(top + np.log(logits.sum(0, dtype=np.float64))) / beta
    return out


def model_bank(model_path: str | Path) -> tuple[list[str], float] | None:
    """(bank captions, beta) of a model folder, None when it has no query bank (a model trained
    before banks were written, or imported). Raises ``ModelError`` for a damaged bank."""
    doc = read_model_config(model_path)
    entry = doc.get("query_bank")
    texts = read_query_bank(model_path, entry)
    if not texts:
        return None
    try:
        beta = float(entry.get("beta"))
    except (TypeError, ValueError):
        beta = float("nan")
    if not (math.isfinite(beta) and 0 < beta <= MAX_BETA):
        raise ModelError(f"{Path(model_path) / 'config.json'}: the query bank's beta must be a number in (0, "
                         f"{MAX_BETA:g}] (the model's logit scale), got {entry.get('beta')!r:.40}")
    return texts, beta


@dataclass
class QBNorm:
    """The stored offsets of an index: ``offset [max id + 1]`` float32 indexed by vector id (NaN:
    no row), memory-mapped; ``fill``: the offset of an id without one (the median offset)."""
    offset: np.ndarray
    beta: float
    bank: int
    fill: float = 0.0

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Offsets of ``ids`` ``[m]``; an id without one (added after the statistics, e.g. while a
        server swaps to a new build) gets :attr:`fill`, so that it is neither pushed up nor down."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self.offset))
        out = np.full(len(ids), self.fill, np.float32)
        out[inside] = self.offset[ids[inside]]
        return np.where(np.isnan(out), np.float32(self.fill), out)

    def rerank(self, ids: np.ndarray, scores: np.ndarray, keep: int,
               depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``keep`` of the candidates ``ids [m]`` (cosine order, ``scores [m]``) ranked by
        ``score + offset`` within consecutive blocks of ``depth`` candidates (stable: ties keep the
        cosine order); scores stay cosine. Block by block, so a longer candidate list only appends
        to a shorter one's ranking: pages never overlap or skip across windows."""
        depth = depth or RERANK_DEPTH
        adjusted = scores + self.of(ids)
        order = np.concatenate([s + np.argsort(-adjusted[s:s + depth], kind="stable")
                                for s in range(0, len(ids), depth)] or [np.zeros(0, np.int64)])[:keep]
        return ids[order], scores[order]


def _bank_digest(texts: Sequence[str], beta: float) -> str:
    return hashlib.sha256(("\n".join(texts) + f"\n{beta:.6g}").encode("utf-8")).hexdigest()[:16]


def _read_table(folder: Path, mmap: bool = False) -> np.ndarray:
    """The offsets by id ``[max id + 1]`` float32. Raises ``OSError`` / ``ValueError`` for a
    missing or damaged file (another dtype or shape included)."""
    table = np.load(folder / STATS_FILE, mmap_mode="r" if mmap else None)
    if table.dtype != np.float32 or table.ndim != 1:
        raise ValueError(f"dtype {table.dtype}, shape {table.shape}: not float32 offsets by id")
    return table


def _stored(folder: Path, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(bank vectors, offsets by id) kept from the last run with the same bank and beta, or None
    (none, another bank, or damaged files: everything is computed again)."""
    try:
        with np.load(folder / BANK_FILE) as f:
            if str(f["digest"]) != digest:
                return None
            bank = f["bank"].astype(np.float32)
        return bank, _read_table(folder)
    except (OSError, KeyError, ValueError, EOFError):
        return None


def healthy(folder: Path, manifest: dict) -> bool:
    """Whether an index's stored offsets match its manifest (False: a run recomputes them)."""
    entry = manifest.get("qbnorm")
    if entry is None:
        return "qbnorm" in manifest
    try:
        _read_table(folder, mmap=True)
    except (OSError, ValueError, EOFError):
        return False
    return isinstance(entry, dict)


def _new_offsets(catalog: Catalog, dim: int, bank: np.ndarray, beta: float, ids: np.ndarray, every: bool):
    """(ids, offsets) of ``ids``: streamed from the catalog when ``every`` row is new, else read by id."""
    if every:
        parts = [(i, offsets(bank, v, beta)) for i, v in catalog.iter_vectors(dim, BLOCK)]
    else:
        parts = [(ids[s:s + BLOCK], offsets(bank, catalog.vectors_for(ids[s:s + BLOCK].tolist(), dim), beta))
                 for s in range(0, len(ids), BLOCK)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclass
class Bank:
    """A query bank as the offsets are computed with it: unit vectors ``[B, D]`` float32, beta, and
    the digest of its captions and beta."""
    vectors: np.ndarray
    beta: float
    digest: str


@dataclass
class KnownOffsets:
    """Offsets computed elsewhere (the Spark path's add tasks, :func:`.distributed.build`):
    ``offsets [n]`` of vector ``ids [n]`` against ``bank``."""
    bank: Bank
    ids: np.ndarray
    offsets: np.ndarray


def embedded_bank(folder: Path, texts: Sequence[str], beta: float,
                  embed_texts: Callable[[Sequence[str]], np.ndarray]) -> Bank:
    """The bank's vectors: kept from the index's last run with the same captions and beta, else
    embedded now with ``embed_texts`` (texts -> unit vectors ``[n, D]``)."""
    digest = _bank_digest(texts, beta)
    kept = _stored(folder, digest)
    vectors = kept[0] if kept is not None else np.asarray(embed_texts(list(texts)), np.float32)
    return Bank(vectors, beta, digest)


def update(folder: Path, catalog: Catalog, dim: int, texts: Sequence[str], beta: float,
           embed_texts: Callable[[Sequence[str]], np.ndarray], known: KnownOffsets | None = None) -> dict:
    """Bring the index's hubness statistics up to date with the catalog's indexed rows: offsets
    for rows added since the last run (all rows when the bank or beta changed), rows gone
    cleared. ``embed_texts`` maps texts to unit vectors ``[n, D]`` (the index's query encoder);
    ``known``: offsets already computed with this bank (others are ignored), used for the rows
    they cover. Writes :data:`STATS_FILE` (offsets by vector id) and :data:`BANK_FILE` (bank
    vectors, beta, digest). -> the manifest's ``qbnorm`` entry (``method``, ``beta``, ``bank``,
    ``computed``: rows scored now, by this process or, ``by_tasks``, the ones ``known`` gave)."""
    digest = _bank_digest(texts, beta)
    kept = _stored(folder, digest)
    known = known if known is not None and known.bank.digest == digest else None
    bank = kept[0] if kept is not None else known.bank.vectors if known is not None else \
        np.asarray(embed_texts(list(texts)), np.float32)
    old = kept[1] if kept is not None else np.zeros(0, np.float32)
    ids = catalog.filter_ids(PhotoFilter())
    size = int(ids.max()) + 1 if len(ids) else 0
    table = np.full(size, np.nan, np.float32)
    had = ids[ids < len(old)]
    table[had] = old[had]
    todo = ids[np.isnan(table[ids])]
    by_tasks = 0
    if known is not None:
        hit = np.isin(known.ids, todo)
        table[known.ids[hit]] = known.offsets[hit]
        by_tasks, todo = int(hit.sum()), ids[np.isnan(table[ids])]
    new_ids, new_off = _new_offsets(catalog, dim, bank, beta, todo, every=len(todo) == len(ids))
    table[new_ids] = new_off
    with atomic_path(folder / STATS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    if kept is None:  # a bank embedded now: kept for the next runs (unchanged otherwise)
        with atomic_path(folder / BANK_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, bank=bank, beta=np.float64(beta), digest=np.array(digest))
    fill = float(np.nanmedian(table)) if len(ids) else 0.0
    return {"method": "QB-Norm, inverted softmax over the model's query bank", "beta": round(beta, 4),
            "bank": len(texts), "computed": int(len(new_ids)) + by_tasks, "by_tasks": by_tasks,
            "fill": round(fill, 6)}


def load(folder: Path, manifest: dict) -> QBNorm | None:
    """The stored offsets of an index whose manifest records them (memory-mapped), else None (an
    index built before them, or with a model without a query bank). A
    damaged or missing file: a warning, and None (search goes on by cosine)."""
    entry = manifest.get("qbnorm")
    if not entry:
        return None
    try:
        if not isinstance(entry, dict):
            raise ValueError(f"manifest entry {entry!r:.40}")
        beta, fill = float(entry["beta"]), float(entry.get("fill", 0.0))
        if not (math.isfinite(beta) and beta > 0 and math.isfinite(fill)):
            raise ValueError(f"beta {entry['beta']!r:.20}, fill {entry.get('fill')!r:.20}")
        return QBNorm(_read_table(folder, mmap=True), beta, int(entry.get("bank", 0)), fill)
    except (OSError, KeyError, ValueError, TypeError, EOFError) as e:
        log.warning("%s: hubness statistics unreadable (%s); ranking by cosine (re-run `dualsearch index` to "
                    "compute them again)", folder / STATS_FILE, e)
        return None


def bank_for(model_path: str | Path, doing: str = "indexing") -> tuple[list[str], float] | None:
    """:func:`model_bank`, a damaged bank logged and treated as none (``doing`` goes on without
    the correction)."""
    try:
        return model_bank(model_path)
    except ModelError as e:
        log.warning("%s; %s without the hubness correction", e, doing)
        return None
