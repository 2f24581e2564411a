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

At search the ANN index returns :data:`OVERFETCH` times the requested window by cosine, and the
window is re-ranked by ``cosine + offset``: an approximation of the exact correction, which would
re-score the whole gallery. Results keep their cosine as ``score``.

Measured on held-out recall (``python bench/quality.py --variants "default,default + QB-Norm"``,
3 training seeds, the exact correction over the whole held-out gallery), see BENCHMARKS.md.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..model.folder import ModelError, read_model_config, read_query_bank
from ..storage import atomic_path
from .catalog import Catalog, PhotoFilter

log = logging.getLogger(__name__)

STATS_FILE = "qbnorm.npy"  # float32 offset by vector id
BANK_FILE = "qbnorm_bank.npz"  # the bank's vectors, beta and digest (what the offsets were computed with)
OVERFETCH = 2  # the ANN window re-ranked is this many times the results asked for
BLOCK = 65536  # images scored against the bank at a time ([B, BLOCK] float32 scores)


def offsets(bank: np.ndarray, vectors: np.ndarray, beta: float) -> np.ndarray:
    """Per-image QB-Norm offsets ``[n]`` float32 (cosine units, <= 0) for unit ``vectors [n, D]``
    against unit ``bank [B, D]`` query vectors at inverse temperature ``beta`` (> 0): ``-logsumexp_b
    (beta * bank_b . v) / beta`` (module docstring). ``bank`` with no rows: zeros."""
    if len(bank) == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    out = np.empty(len(vectors), np.float32)
    b = np.asarray(bank, np.float32)
    for s in range(0, len(vectors), BLOCK):
        logits = beta * (b @ np.asarray(vectors[s:s + BLOCK], np.float32).T).astype(np.float64)  # [B, n]
        top = logits.max(0)
        out[s:s + BLOCK] = -(top + np.log(np.exp(logits - top).sum(0))) / beta
    return out


def model_bank(model_path: str | Path) -> tuple[list[str], float] | None:
    """(bank captions, beta) of a model folder, None when it has no query bank (a model trained
    before banks were written, or imported). Raises ``ModelError`` for a damaged bank."""
    doc = read_model_config(model_path)
    entry = doc.get("query_bank")
    texts = read_query_bank(model_path, entry)
    if not texts or not entry.get("beta"):
        return None
    return texts, float(entry["beta"])


@dataclass
class QBNorm:
    """The stored offsets of an index: ``offset [max id + 1]`` float32 indexed by vector id (NaN:
    no row), memory-mapped."""
    offset: np.ndarray
    beta: float
    bank: int

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Offsets of ``ids`` ``[m]`` (an id without one, e.g. added after the stats: 0)."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self.offset))
        out = np.zeros(len(ids), np.float32)
        out[inside] = self.offset[ids[inside]]
        return np.nan_to_num(out, nan=0.0)

    def rerank(self, ids: np.ndarray, scores: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``keep`` of the candidates ``ids [m]`` with cosine ``scores [m]``, ordered by
        ``score + offset`` (stable: ties keep the cosine order); their cosine scores unchanged."""
        order = np.argsort(-(scores + self.of(ids)), kind="stable")[:keep]
        return ids[order], scores[order]


def _bank_digest(texts: Sequence[str], beta: float) -> str:
    return hashlib.sha256(("\n".join(texts) + f"\n{beta:.6g}").encode("utf-8")).hexdigest()[:16]


def _stored(folder: Path, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(bank vectors, offsets by id) kept from the last run with the same bank and beta, or None."""
    try:
        with np.load(folder / BANK_FILE) as f:
            if str(f["digest"]) != digest:
                return None
            bank = f["bank"].astype(np.float32)
        return bank, np.load(folder / STATS_FILE)
    except (OSError, KeyError, ValueError):
        return None


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


def update(folder: Path, catalog: Catalog, dim: int, texts: Sequence[str], beta: float,
           embed_texts: Callable[[Sequence[str]], np.ndarray]) -> dict:
    """Bring the index's hubness statistics up to date with the catalog's indexed rows: offsets
    for rows added since the last run (all rows when the bank or beta changed), rows gone
    cleared. ``embed_texts`` maps texts to unit vectors ``[n, D]`` (the index's query encoder).
    Writes :data:`STATS_FILE` (offsets by vector id) and :data:`BANK_FILE` (bank vectors, beta,
    digest). -> the manifest's ``qbnorm`` entry (``method``, ``beta``, ``bank``, ``computed``:
    rows scored now)."""
    digest = _bank_digest(texts, beta)
    kept = _stored(folder, digest)
    bank = kept[0] if kept is not None else np.asarray(embed_texts(list(texts)), np.float32)
    old = kept[1] if kept is not None else np.zeros(0, np.float32)
    ids = catalog.filter_ids(PhotoFilter())
    size = int(ids.max()) + 1 if len(ids) else 0
    table = np.full(size, np.nan, np.float32)
    had = ids[ids < len(old)]
    table[had] = old[had]
    todo = ids[np.isnan(table[ids])]
    new_ids, new_off = _new_offsets(catalog, dim, bank, beta, todo, every=len(todo) == len(ids))
    table[new_ids] = new_off
    with atomic_path(folder / STATS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    with atomic_path(folder / BANK_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, bank=bank, beta=np.float64(beta), digest=np.array(digest))
    return {"method": "QB-Norm, inverted softmax over the model's query bank", "beta": round(beta, 4),
            "bank": len(texts), "computed": int(len(new_ids))}


def load(folder: Path, manifest: dict) -> QBNorm | None:
    """The stored offsets of an index whose manifest records them (memory-mapped), else None (an
    index built before them, built with ``--no-qbnorm``, or a model without a query bank). A
    damaged or missing file: a warning, and None (search goes on by cosine)."""
    entry = manifest.get("qbnorm")
    if not entry:
        return None
    try:
        table = np.load(folder / STATS_FILE, mmap_mode="r")
        if table.dtype != np.float32 or table.ndim != 1:
            raise ValueError(f"dtype {table.dtype}, shape {table.shape}")
        return QBNorm(table, float(entry["beta"]), int(entry.get("bank", 0)))
    except (OSError, KeyError, ValueError) as e:
        log.warning("%s: hubness statistics unreadable (%s); ranking by cosine", folder / STATS_FILE, e)
        return None


def bank_for(model_path: str | Path) -> tuple[list[str], float] | None:
    """:func:`model_bank`, a damaged bank logged and treated as none (indexing goes on without
    the correction)."""
    try:
        return model_bank(model_path)
    except ModelError as e:
        log.warning("%s; indexing without the hubness correction", e)
        return None
