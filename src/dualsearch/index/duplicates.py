"""Near-duplicate images: resized, re-encoded and slightly cropped copies of one picture.

Two images are near-duplicates when the cosine of their embeddings is at least ``threshold``. The
whole collection is grouped by :func:`find_duplicates`: each vector's neighbours above the threshold
come from the ANN index (FAISS ``range_search`` on flat and HNSW indexes, where it returns every
neighbour above the threshold; a k-nearest-neighbour search with a small ``k`` on IVF-PQ, whose
fast-scan lists do not answer range queries), and the pairs are joined into groups as the connected
components of the neighbour graph (union-find; ``scipy.sparse.csgraph``). At query time,
:func:`collapse` keeps the best-ranked image of each group among a result list, with a count.

``DEFAULT_THRESHOLD`` comes from measurements on generated copies (tests/test_duplicates.py): a real
photo (matplotlib's grace_hopper.jpg) cut into nine non-overlapping tiles, enlarged to 600 x 510
(photos are larger than the model's 224-pixel input), each copied three ways (resized to 50-70 %,
JPEG quality 40-70, cropped by 5-10 % then resized back), embedded through the indexing path by the
default image tower (EfficientNet-Lite0, ImageNet weights) behind a fresh projection head of the
default width (256); cosine between each copy and its original, against cosine between distinct
tiles:

  - copies: resized min 0.996 (median 0.998), JPEG min 0.992 (0.996), cropped min 0.882 (0.933);
  - distinct tiles: max 0.813, median 0.455 (36 pairs).

0.85 sits between the lowest copy and the highest distinct pair. Cautions from the same
measurements: with a 64-d head the highest distinct pair was 0.80-0.84 depending on the head's
random initialisation (a narrower projection distorts cosines more); small originals (the tiles
at 200 x 170, below the model's input) lose more in a resized or re-encoded copy (down to
0.80-0.88), and copies with all three changes at once fall to 0.79-0.83; on the generated shapes
pictures (flat colours over fine noise) copies fall to ~0.83 while two pictures of one shape in
one colour reach 0.98, so no threshold separates them there; the tests' tiny ViT (2 epochs, 16-d)
embeds every picture within 0.9999 of every other. The threshold depends on the model and the
photos: ``--threshold`` takes another value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import DualsearchError
from . import ann

DEFAULT_THRESHOLD = 0.85  # measured: see the module docstring
NEIGHBOURS = 16  # k of the k-NN search where the index has no range search


class DuplicatesError(DualsearchError):
    """Bad input to the duplicate search (a threshold outside (0, 1], mismatched arrays)."""


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1]; raises :class:`DuplicatesError` otherwise."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise DuplicatesError(f"the duplicate threshold must be a number, got {threshold!r}") from None
    if not 0 < value <= 1:
        raise DuplicatesError(f"the duplicate threshold is a cosine in (0, 1], got {threshold!r}")
    return value


def _has_range_search(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(ann._inner(index))
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSW))


def similar_pairs(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, threshold: float,
                  k: int = NEIGHBOURS, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of indexed vectors with cosine >= ``threshold``: ``(a [p], b [p], cosine [p])``, ids
    with ``a < b``, each pair once. ``ids [N]`` and ``vectors [N, D]`` are the index's own (the
    catalog's ``vectors(dim)``); queried ``batch`` at a time (range search, or the ``k`` nearest
    neighbours: see the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(ids) != len(vectors):
        raise DuplicatesError(f"{len(ids)} ids but {len(vectors)} vectors")
    parts_a, parts_b, parts_s = [], [], []
    ranged = _has_range_search(index)
    for s in range(0, len(ids), batch):
        block, block_ids = vectors[s:s + batch], ids[s:s + batch]
        if ranged:
            lims, scores, nbrs = index.range_search(block, float(threshold))
            src = np.repeat(block_ids, np.diff(lims).astype(np.int64))
        else:
            scores, nbrs = ann.search(index, block, min(k + 1, max(1, index.ntotal)))
            src = np.repeat(block_ids, nbrs.shape[1])
            scores, nbrs = scores.ravel(), nbrs.ravel()
        keep = (nbrs >= 0) & (scores >= threshold) & (nbrs != src)
        a, b = np.minimum(src[keep], nbrs[keep]), np.maximum(src[keep], nbrs[keep])
        parts_a.append(a)
        parts_b.append(b)
        parts_s.append(scores[keep])
    if not parts_a:  # an empty index
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    a, b, sc = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    if len(a) == 0:
        return a, b, sc.astype(np.float32)
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[first], b[first], sc[first].astype(np.float32)


def group_pairs(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Connected components of the graph on ``ids`` with edges ``a[i] - b[i]`` that have two members
    or more: lists of ids (ascending), largest group first (ties: lowest first id)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pa, pb = order[np.searchsorted(sorted_ids, a)], order[np.searchsorted(sorted_ids, b)]
    graph = coo_matrix((np.ones(len(pa), np.int8), (pa, pb)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    groups = [sorted(ids[labels == g].tolist()) for g in np.flatnonzero(sizes > 1)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def find_duplicates(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray,
                    threshold: float = DEFAULT_THRESHOLD, k: int = NEIGHBOURS) -> list[list[int]]:
    """Groups of near-duplicate images among the index's vectors (``ids [N]``, unit ``vectors
    [N, D]``, as ``Catalog.vectors(dim)`` returns them): each a list of ids (ascending), largest
    group first; images without a copy are in none. Two images share a group when a chain of pairs
    with cosine >= ``threshold`` joins them. Raises :class:`DuplicatesError` for a threshold outside
    (0, 1] or mismatched arrays."""
    threshold = check_threshold(threshold)
    a, b, _ = similar_pairs(index, ids, vectors, threshold, k)
    return group_pairs(ids, a, b)


@dataclass
class Collapsed:
    """One result standing for its group: the best-ranked member, its score, how many of the
    results it stands for (itself included) and their ids, best first."""
    id: int
    score: float
    count: int = 1
    members: list[int] = field(default_factory=list)


def collapse(ids: np.ndarray, scores: np.ndarray, vectors: Callable[[np.ndarray], np.ndarray] | np.ndarray,
             threshold: float = DEFAULT_THRESHOLD) -> list[Collapsed]:
    """Ranked results ``ids [m]`` with ``scores [m]`` (best first; ids < 0 are skipped), collapsed
    so that each group of near-duplicates shows once: a result whose cosine with an earlier kept
    result is >= ``threshold`` joins the first such one instead of showing. ``vectors`` is
    ``[m, D]`` (the results' unit vectors, in order) or a getter ``ids -> [m, D]`` (the catalog's,
    or ``ann._reconstruct``). Fetch a few times more results than shown, then keep the first ``k``
    collapsed ones. Raises :class:`DuplicatesError` for a bad threshold or mismatched arrays."""
    threshold = check_threshold(threshold)
    ids, scores = np.asarray(ids, dtype=np.int64).ravel(), np.asarray(scores, dtype=np.float32).ravel()
    valid = ids >= 0
    if len(ids) != len(scores):
        raise DuplicatesError(f"{len(ids)} result ids but {len(scores)} scores")
    vecs = vectors(ids[valid]) if callable(vectors) else np.asarray(vectors)[valid]
    ids, scores = ids[valid], scores[valid]
    if len(vecs) != len(ids):
        raise DuplicatesError(f"{len(ids)} results but {len(vecs)} vectors")
    sims = np.asarray(vecs, np.float32) @ np.asarray(vecs, np.float32).T
    close = sims >= threshold
    has_prior = np.tril(close, -1).any(axis=1)  # only these can join an earlier result
    shown = np.zeros(len(ids), dtype=bool)
    slot = np.zeros(len(ids), dtype=np.int64)  # a shown result's place in ``out``
    out: list[Collapsed] = []
    for i in range(len(ids)):
        home = np.flatnonzero(close[i, :i] & shown[:i]) if has_prior[i] else ()
        if len(home):
            group = out[slot[home[0]]]
            group.count += 1
            group.members.append(int(ids[i]))
            continue
        shown[i], slot[i] = True, len(out)
        out.append(Collapsed(int(ids[i]), float(scores[i]), 1, [int(ids[i])]))
    return out
