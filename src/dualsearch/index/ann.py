"""Approximate nearest-neighbour indexes with FAISS (inner product on unit vectors = cosine).

Kinds, as the FAISS guidelines and autofaiss choose them:
  - ``flat``: exact search (IndexFlatIP); small collections;
  - ``hnsw``: IndexHNSWFlat (M=32), when the full vectors fit the memory budget;
  - ``ivfpq``: IVF with fast-scan product quantization and a refine step over fp16 codes (SQ8
    when the budget is tight), for large collections or a tight budget (about d/2 + 2d + 24 bytes a
    vector, or d/2 + d + 24 with SQ8, instead of 4d).
Search parameters (efSearch, nprobe, k_factor) are tuned after building so that recall@10 against
exact search reaches the target on a sample of the collection's own vectors.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np

from ..errors import DualsearchError
from ..storage import atomic_path

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX = 50_000
HNSW_COARSE_MIN = 2_000_000  # IVF-PQ over more vectors than this uses an HNSW coarse quantizer


class ANNError(DualsearchError):
    pass


def choose_kind(n: int, dim: int, memory_budget_bytes: float = 8e9) -> str:
    """Exact below ``FLAT_MAX`` vectors; HNSW while the raw vectors plus graph fit the budget;
    IVF-PQ beyond."""
    if n <= FLAT_MAX:
        return "flat"
    hnsw_bytes = n * (4 * dim + 32 * 2 * 4 + 16)
    return "hnsw" if hnsw_bytes <= memory_budget_bytes and n <= 20_000_000 else "ivfpq"


def ivf_lists(n: int) -> int:
    """nlist ~ 4 sqrt(n), at least 39 training points per list (FAISS's warning threshold)."""
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


def _inner(index):
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def ivfpq_refine(n: int, dim: int, memory_budget_bytes: float = 8e9) -> str:
    """The codes IVF-PQ re-ranks its candidates with: fp16 (recall close to exact) when they fit
    the budget, else 8-bit (a quarter of the raw vectors, but on dense collections its rounding
    caps recall@10 near 0.95: bench/scale.py)."""
    return "SQfp16" if n * (2 * dim + dim / 2 + 64) <= memory_budget_bytes else "SQ8"


def new_index(kind: str, dim: int, n: int, refine: str = "SQ8") -> faiss.Index:
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
    elif kind == "ivfpq":
        m = dim // 2 if dim % 2 == 0 else dim
        # past a few thousand lists, an HNSW graph over the centroids assigns vectors to lists far
        # faster than comparing with every centroid (the FAISS guidelines' IVF..._HNSW32)
        coarse = f"IVF{ivf_lists(n)}" + ("_HNSW32" if n > HNSW_COARSE_MIN else "")
        inner = faiss.index_factory(dim, f"{coarse},PQ{m}x4fs,Refine({refine})", faiss.METRIC_INNER_PRODUCT)
    else:
        raise ANNError(f"unknown ANN kind {kind!r}: choose one of {', '.join(KINDS)}")
    return faiss.IndexIDMap2(inner)


def train_index(index: faiss.Index, sample: np.ndarray) -> None:
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))


def set_params(index: faiss.Index, params: dict) -> None:
    """Apply search parameters (efSearch for HNSW; nprobe and k_factor for IVF-PQ)."""
    inner = _inner(index)
    if "efSearch" in params:
        faiss.downcast_index(inner).hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params or "k_factor" in params:
        refine = faiss.downcast_index(inner)
        if isinstance(refine, faiss.IndexRefine):
            refine.k_factor = float(params.get("k_factor", 1))
            ivf = faiss.extract_index_ivf(refine.base_index)
        else:
            ivf = faiss.extract_index_ivf(refine)
        ivf.nprobe = int(params.get("nprobe", 1))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # it must find the nprobe nearest lists
            quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)


HNSW_EF = (16, 32, 64, 128, 256, 512, 1024)
IVF_NPROBE = (4, 8, 16, 32, 64, 128, 256, 512)
IVF_K_FACTOR = (4, 16, 64, 256, 1024)  # candidates re-ranked by the refine codes: k * k_factor


def recall_at(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    _, got = index.search(queries, k)
    hits = sum(len(set(g[g >= 0]) & set(t[t >= 0])) for g, t in zip(got, truth))
    return hits / max(1, (truth >= 0).sum())


def exact_knn(queries: np.ndarray, batches: "Batches", k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours (scores, ids) of ``queries`` over vectors given in
    blocks, holding one block at a time (FAISS's ResultHeap merges the per-block results)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    flat = faiss.IndexFlatIP(queries.shape[1])
    for ids, vecs in batches():
        flat.add(np.ascontiguousarray(vecs, dtype=np.float32))
        d, pos = flat.search(queries, k)
        flat.reset()
        heap.add_result(d, np.where(pos >= 0, np.asarray(ids, np.int64)[np.clip(pos, 0, None)], -1))
    heap.finalize()
    return heap.D, heap.I


def tune(index: faiss.Index, kind: str, queries: np.ndarray, truth: np.ndarray, target: float = 0.95
         ) -> tuple[dict, float]:
    """The fastest search parameters tried that reach ``target`` recall@10 against the exact
    neighbours ``truth`` of ``queries`` (else the ones with the best recall).

    HNSW: efSearch grows until recall clears the target by a margin. IVF-PQ: for each nprobe,
    k_factor grows while it still adds recall; nprobe grows while the best recall still rises
    (past that point the codes, not the lists scanned, bound the recall)."""
    if kind == "flat" or len(queries) == 0:
        return {}, 1.0
    trials: list[tuple[dict, float, float]] = []
    margin = target + 0.01  # a small margin over the sample's noise

    def trial(params: dict) -> float:
        set_params(index, params)
        t0 = time.perf_counter()
        r = recall_at(index, queries, truth)
        trials.append((params, r, time.perf_counter() - t0))
        return r

    if kind == "hnsw":
        for ef in HNSW_EF:
            if trial({"efSearch": ef}) >= margin:
                break
    else:
        nlist = faiss.extract_index_ivf(index).nlist  # through the id map and refine step, if any
        nprobes = [p for p in IVF_NPROBE if p < nlist] + [nlist]
        row_best = -1.0
        for nprobe in nprobes:
            last = best_here = -1.0
            for kf in IVF_K_FACTOR:
                r = trial({"nprobe": nprobe, "k_factor": kf})
                best_here = max(best_here, r)
                if r >= margin or r - last < 0.002:
                    break
                last = r
            if best_here >= margin or best_here - row_best < 0.002:
                break
            row_best = best_here
    meeting = [t for t in trials if t[1] >= target]
    params, recall, _ = min(meeting, key=lambda t: t[2]) if meeting else max(trials, key=lambda t: t[1])
    set_params(index, params)
    if recall < target:
        log.warning("ANN recall@10 %.3f is below the target %.2f with the largest parameters tried", recall, target)
    return params, recall


def tuning_queries(sample: np.ndarray, n_queries: int = 500, seed: int = 0) -> np.ndarray:
    """Queries near, not at, stored vectors: noise of norm ~0.5 (text queries sit about that far
    from the images they match)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(sample), size=min(n_queries, len(sample)), replace=False)
    dim = sample.shape[1]
    q = sample[pick] + rng.normal(scale=0.5 / np.sqrt(dim), size=(len(pick), dim)).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class BuiltIndex:
    index: faiss.Index
    kind: str
    params: dict
    recall: float
    seconds: dict = field(default_factory=dict)  # train / add / tune
    stats: dict = field(default_factory=dict)  # other figures of the build (e.g. Spark tasks' peak RSS, MiB)


Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def blocks(vectors: np.ndarray, ids: np.ndarray, size: int = 65536) -> Batches:
    """In-memory vectors as a re-iterable source of (ids, vectors) blocks."""
    return lambda: ((ids[s:s + size], vectors[s:s + size]) for s in range(0, len(vectors), size))


def training_size(kind: str, n: int) -> int:
    """Vectors to sample: IVF trains on >= 39 per list (FAISS warns below), capped at 1M; HNSW
    draws only its tuning queries from the sample; exact search needs none."""
    if kind == "flat":
        return 0
    if kind != "ivfpq":
        return min(n, 500)
    return min(n, max(256 * 1024, min(40 * ivf_lists(n), 1 << 20)))


def _gather(batches: Batches, positions: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at sorted ``positions`` of the stream, in one pass."""
    out = np.empty((len(positions), dim), np.float32)
    start = got = 0
    for _, vecs in batches():
        stop = start + len(vecs)
        hi = np.searchsorted(positions, stop)
        if hi > got:
            out[got:hi] = vecs[positions[got:hi] - start]
            got = hi
        start = stop
    if got != len(positions):
        raise ANNError(f"the vector source ended after {start} vectors; {positions[-1] + 1} expected")
    return out


def build_stream(batches: Batches, n: int, dim: int, kind: str = "auto", memory_budget_bytes: float = 8e9,
                 target_recall: float = 0.95, seed: int = 0) -> BuiltIndex:
    """Build, fill and tune an index from unit vectors read block by block from ``batches`` (called
    once per pass; ``n`` vectors in all), never holding more than one block beside the index: a
    training sample is gathered in one pass, the vectors are added in a second, and the exact
    neighbours of the tuning queries are computed in a third."""
    auto = kind == "auto"
    if auto:
        kind = choose_kind(n, dim, memory_budget_bytes)
    if kind == "ivfpq" and n < 2000:
        log.warning("ivfpq needs a few thousand vectors to train; %d given, using flat", n)
        kind = "flat"
    refine = ivfpq_refine(n, dim, memory_budget_bytes)
    index = new_index(kind, dim, n, refine)
    seconds = {}
    if n == 0:
        return BuiltIndex(index, kind, {}, 1.0, seconds)
    t = time.perf_counter()
    sample = None
    if kind != "flat":  # exact search needs no pass to sample, train or tune
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(n, size=training_size(kind, n), replace=False))
        sample = _gather(batches, positions, dim)
        train_index(index, sample)
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    added = 0
    for ids, vecs in batches():
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        added += len(vecs)
    if added != n:
        raise ANNError(f"the vector source gave {added} vectors; {n} expected")
    seconds["add"] = time.perf_counter() - t
    t = time.perf_counter()
    params, recall = {}, 1.0
    if kind != "flat":
        queries = tuning_queries(sample, seed=seed)
        del sample
        _, truth = exact_knn(queries, batches, 10)
        params, recall = tune(index, kind, queries, truth, target_recall)
    seconds["tune"] = time.perf_counter() - t
    if auto and recall < target_recall and n * dim * 4 <= memory_budget_bytes:
        # vectors without neighbourhood structure defeat every ANN index: stay exact rather than
        # answer with low recall
        log.warning("%s reaches recall@10 %.3f < %.2f on this collection; using exact search", kind, recall,
                    target_recall)
        return build_stream(batches, n, dim, "flat", memory_budget_bytes, target_recall, seed)
    if kind == "ivfpq":
        params = {**params, "refine": refine}  # recorded in the manifest (set_params ignores it)
    return BuiltIndex(index, kind, params, recall, seconds)


def build(vectors: np.ndarray, ids: np.ndarray, kind: str = "auto", memory_budget_bytes: float = 8e9,
          target_recall: float = 0.95) -> BuiltIndex:
    """Build, fill and tune an index from in-memory unit vectors ``[N, D]`` and their ids ``[N]``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    return build_stream(blocks(vectors, ids), len(vectors), vectors.shape[1], kind, memory_budget_bytes,
                        target_recall)


def write(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write atomically (:func:`dualsearch.storage.atomic_path`); raises ``StorageError``.

    FAISS's own file writer only prints a failed ``fclose`` (a full disk) and returns; writing
    through a Python callback makes every failed write raise."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer


def read(path: str | os.PathLike, params: dict | None = None, mmap: bool = True) -> faiss.Index:
    """The FAISS index at ``path`` with its search ``params`` set. ``mmap``: the flat code arrays
    (flat vectors, HNSW's storage, IVF-PQ's refine codes) are memory-mapped (``IO_FLAG_MMAP_IFC``,
    read-only) instead of read into memory: a 1M x 256 flat index opens in 0.16 s instead of 2.1 s
    here, and pages in as searched. An on-disk index (``ondisk.merge``: inverted lists in
    ``NAME.<token>.ivfdata`` beside it) gets its lists memory-mapped read-only from the index file's
    own folder, wherever that folder has moved (what ``IO_FLAG_ONDISK_SAME_DIR`` does, which faiss
    1.15.1 refuses beside ``IO_FLAG_MMAP_IFC``). Raises :class:`ANNError` for a damaged file or
    missing list data."""
    ondisk = bool((params or {}).get("ondisk")) or any(Path(path).parent.glob(glob.escape(Path(path).name)
                                                                            + ".*.ivfdata"))
    flags = faiss.IO_FLAG_MMAP_IFC if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC") else 0
    if ondisk:  # read the lists' offsets only; they are mapped below
        flags |= faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ANNError(f"{path}: damaged or unreadable FAISS index ({str(e).splitlines()[0]})") from e
    if ondisk:
        _map_lists(index, Path(path))
    if params:
        set_params(index, params)
    return index


def _map_lists(index: faiss.Index, path: Path) -> None:
    """Memory-map the ``OnDiskInvertedLists`` of ``index`` from the file of the same name in ``path``'s folder."""
    try:
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:
        return
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return
    data = path.parent / Path(lists.filename).name
    if not data.is_file():
        raise ANNError(f"{path}: its inverted lists {data.name} are missing from {path.parent}")
    if data.stat().st_size < lists.totsize:  # mapping past the end would crash on first touch (SIGBUS)
        raise ANNError(f"{data}: truncated inverted lists ({data.stat().st_size} of {lists.totsize} bytes)")
    lists.filename = str(data)
    lists.prefetch_nthread = 0  # its threads, started on every search, halved one-query QPS from page cache
    try:
        lists.do_mmap()
    except RuntimeError as e:
        raise ANNError(f"{data}: unreadable inverted lists ({str(e).splitlines()[0]})") from e


# ---------------------------------------------------------------------------- filtered search
VectorGetter = Callable[[np.ndarray], np.ndarray]
"""``ids [m] int64 -> vectors [m, D] float32`` in the order asked (e.g. read from the catalog)."""

# allowed sets up to this many ids, or this fraction of the index, are scored exactly (see :func:`search`)
EXACT_MAX = {"flat": 0, "hnsw": 4000, "ivf": 1000}
EXACT_FRACTION = {"flat": 0.0, "hnsw": 0.01, "ivf": 0.005}
WIDEN_POWER = {"hnsw": 0.5, "ivf": 0.5}  # first try: efSearch x (1/s)**p, nprobe x (1/s)**p (s: selectivity)
WIDEN_STEP = 4  # then x4 for the queries still short of results, up to
WIDEN_STEPS = 3  # this many times before scoring those queries exactly
BITMAP_MAX_SPARSITY = 64  # a bitmap selector while the largest id is below 64x the number allowed


def _selector(allowed: np.ndarray):
    """A FAISS selector over the sorted external ids ``allowed``: a bitmap (one bit per id up to the
    largest) when the ids are dense enough, else a hash set (``IDSelectorBatch``: a bloom filter in
    front of an unordered set, slower to build and to test)."""
    top = int(allowed[-1]) + 1
    if allowed[0] >= 0 and top <= BITMAP_MAX_SPARSITY * len(allowed) + 4096:
        bits = np.zeros(top, dtype=bool)
        bits[allowed] = True
        return faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))
    return faiss.IDSelectorBatch(allowed)


def _ivf_params(ivf, sel, nprobe: int):
    quantizer = faiss.downcast_index(ivf.quantizer)
    qparams = None
    if isinstance(quantizer, faiss.IndexHNSW):  # as in set_params: it must find the nprobe nearest lists
        qparams = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe, quantizer.hnsw.efSearch))
    return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe, quantizer_params=qparams)


def _filter_params(index: faiss.Index, sel, widen: float, min_ef: float = 0) -> tuple[object, bool]:
    """Search parameters that apply ``sel`` (over external ids) to ``index``, with efSearch or
    nprobe ``widen`` times the index's current settings (:func:`set_params`), efSearch at least
    ``min_ef``; and whether they are the widest there are (every list probed, or efSearch at the
    index size).

    ``IndexIDMap2.search`` translates a selector in the top-level parameters to its internal ids,
    but ``IndexRefine`` passes only its ``base_index_params`` down, and their selector is not
    translated (faiss 1.8-1.15): it is wrapped here in ``IDSelectorTranslated`` over the id map."""
    inner = faiss.downcast_index(_inner(index))
    widen = max(1.0, widen)
    if isinstance(inner, faiss.IndexHNSW):
        ef = int(min(max(inner.hnsw.efSearch * widen, min_ef), max(inner.ntotal, inner.hnsw.efSearch)))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=ef), ef >= inner.ntotal
    if isinstance(inner, faiss.IndexRefine):
        ivf = faiss.extract_index_ivf(inner.base_index)
        local = faiss.IDSelectorTranslated(index.id_map, sel) if isinstance(index, faiss.IndexIDMap) else sel
        nprobe = int(min(ivf.nprobe * widen, ivf.nlist))
        base = _ivf_params(ivf, local, nprobe)
        params = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=base)
        params.keep_ = (sel, local, base)  # the C++ objects must outlive the search
        return params, nprobe >= ivf.nlist
    if isinstance(inner, faiss.IndexIVF):
        nprobe = int(min(inner.nprobe * widen, inner.nlist))
        return _ivf_params(inner, sel, nprobe), nprobe >= inner.nlist
    return faiss.SearchParameters(sel=sel), True  # exhaustive: already exact among the allowed


def _code_store(index: faiss.Index):
    """The flat code array holding every vector of ``index`` (IndexFlat, HNSW's storage, IVF-PQ's
    refine codes), in the order of its internal ids; None for other layouts."""
    inner = faiss.downcast_index(_inner(index))
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    elif isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.refine_index)
    return inner if isinstance(inner, faiss.IndexFlatCodes) else None


def _reconstruct(index: faiss.Index, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [m', D], ids [m'])``: the stored vectors of ``ids`` (exact for flat and HNSW, from
    the refine codes for IVF-PQ), leaving out ids the index does not hold. The codes are gathered
    and decoded in one call where the id map is sorted (ids added in order, as the catalog adds
    them): ~10x faster than FAISS's ``reconstruct_batch``, one id at a time through a hash map."""
    store = _code_store(index)
    if store is not None and store.ntotal == index.ntotal and hasattr(store.codes, "data"):
        id_map = (faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())
                  if isinstance(index, faiss.IndexIDMap) else np.arange(index.ntotal))
        pos = np.searchsorted(id_map, ids).clip(0, max(0, len(id_map) - 1))
        if len(id_map) and (id_map[pos] == ids).all():
            codes = faiss.rev_swig_ptr(store.codes.data(), store.ntotal * store.code_size)
            return store.sa_decode(codes.reshape(store.ntotal, store.code_size)[pos]), ids
    try:
        return index.reconstruct_batch(ids), ids
    except RuntimeError:  # an id the index does not hold, or an index that cannot reconstruct (IVF-PQ alone)
        if not isinstance(index, faiss.IndexIDMap):
            raise ANNError("this index cannot give back its vectors; pass a vector getter") from None
        ids = ids[np.isin(ids, faiss.vector_to_array(index.id_map))]
        try:
            return (index.reconstruct_batch(ids) if len(ids) else np.empty((0, index.d), np.float32)), ids
        except RuntimeError:
            raise ANNError("this index cannot give back its vectors; pass a vector getter") from None


def exact_filtered(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray,
                   vectors: VectorGetter | None = None, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries [n, D]`` among the ``allowed`` ids, reading
    their vectors a block at a time from ``vectors`` (else reconstructing them from ``index``):
    ``(scores [n, k] float32, ids [n, k] int64)``, best first, padded with -inf / -1 past the
    number of allowed ids held. Raises ``ANNError`` when the vectors cannot be had."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for s in range(0, len(allowed), block):
        ids = allowed[s:s + block]
        got, ids = (vectors(ids), ids) if vectors is not None else _reconstruct(index, ids)
        if len(ids) == 0:
            continue
        d, pos = faiss.knn(queries, np.ascontiguousarray(got, dtype=np.float32), min(k, len(ids)),
                           metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1))
    heap.finalize()
    return np.where(heap.I >= 0, heap.D, -np.inf).astype(np.float32), heap.I


def _kind_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(_inner(index))
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat" if isinstance(inner, faiss.IndexFlat) else "ivf"


def exact_route(kind: str, n_allowed: int, ntotal: int) -> bool:
    """Whether :func:`search` scores ``n_allowed`` ids exactly rather than through an index of
    ``kind`` ("flat", "hnsw", "ivf") holding ``ntotal`` vectors."""
    return n_allowed <= EXACT_MAX[kind] or n_allowed <= EXACT_FRACTION[kind] * ntotal


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
           vectors: VectorGetter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` inner products of ``queries [n, D] float32`` in ``index``, among the vector ids
    ``allowed`` (a sorted int64 array; None: no filter). Returns ``(scores [n, k] float32, ids
    [n, k] int64)``, best first, padded with -inf / -1; each row holds at least ``min(k, m)``
    results, ``m`` the allowed ids the index holds (ids it lacks are ignored). ``vectors`` gives
    the exact vectors of ids (else they are reconstructed from the index, IVF-PQ from its refine
    codes). Raises ``ANNError`` when an index that cannot reconstruct needs ``vectors``.

    Strategy, for selectivity ``s = m / ntotal`` (FAISS's id selectors with ``SearchParameters*``):
      - ``m <= EXACT_MAX[kind]`` or ``s <= EXACT_FRACTION[kind]`` (HNSW: 4,000 ids or 1 %;
        IVF-PQ: 1,000 ids or 0.5 %; flat: never): exact search over the allowed vectors
        (:func:`exact_filtered`), which costs ~m while a graph walk or list scan must pass over ~1/s
        rejected vectors for each one kept, and loses recall doing so;
      - else the ANN index with an ``IDSelectorBitmap`` (a hash-set ``IDSelectorBatch`` where the
        ids are sparse), efSearch (HNSW) or nprobe (IVF) first widened by ``(1/s) ** 0.5``
        (``WIDEN_POWER``; HNSW's efSearch at least k/s), then x4 for queries that got fewer than
        ``min(k, m)`` results, and exact search for those still short; a flat index scans only the
        allowed vectors and is exact at once.
    Measured (bench/filter_speed.py, clustered vectors, d=256, one query at a time on one thread of a
    shared 2-core EPYC, recall@10 against brute-force filtered search), QPS (recall):
      1M   HNSW unfiltered 309 (0.992) | 50 %: selector 195 (0.992) | 5 %: selector 125 (0.998),
           exact 14 | 0.1 %: exact 646 (1.0), selector 7 (0.782)
           IVF-PQ unfiltered 1,091 (0.99) | 50 %: selector 380 (0.994) | 5 %: selector 843 (0.999),
           exact 14 | 0.1 %: exact 718 (1.0), selector 416 (0.687)
      200k HNSW 1 %: exact 686 (1.0), selector 230 (0.923) | 5 %: selector 492 (0.999), exact 95
           IVF-PQ 1 %: selector 977 (0.985), exact 510 | 0.1 %: exact 5,113, selector 912 (0.862)
    The bitmap selector answered 3.3x (HNSW) and 8.9x (IVF-PQ) the QPS of ``IDSelectorBatch`` at
    5 % of 1M and takes 0.3 ms to make (the hash set: 8-16 ms for 50,000 ids)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, int(k))
    if allowed is None:
        if index.ntotal == 0:
            return _padded(len(queries), k)
        d, i = index.search(queries, min(k, index.ntotal))
        return _fill(d, i, k)
    allowed = np.asarray(allowed, dtype=np.int64).ravel()
    if len(allowed) > 1 and (np.diff(allowed) <= 0).any():  # unsorted or repeated: sort once
        allowed = np.unique(allowed)
    m = len(allowed)
    if m == 0 or index.ntotal == 0:
        return _padded(len(queries), k)
    if exact_route(_kind_of(index), m, index.ntotal):
        return exact_filtered(index, queries, k, allowed, vectors)
    return _selected(index, queries, k, allowed, vectors)


def _padded(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def _fill(d: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's ``(scores, ids)`` padded to ``k`` columns, -inf where no id was found."""
    scores, ids = _padded(len(d), k)
    scores[:, :d.shape[1]] = np.where(i >= 0, d, -np.inf)
    ids[:, :i.shape[1]] = i
    return scores, ids


def _selected(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray,
              vectors: VectorGetter | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` through the ANN index with a selector, widening for queries left short."""
    sel = _selector(allowed)
    need = min(k, len(allowed))
    kind = _kind_of(index)
    widen = (index.ntotal / len(allowed)) ** WIDEN_POWER.get(kind, 0.0)
    min_ef = k * index.ntotal / len(allowed)  # a graph walk keeps ~s of the nodes it visits: k / s
    scores, ids = _padded(len(queries), k)
    rows = np.arange(len(queries))
    for _ in range(WIDEN_STEPS + 1):
        params, widest = _filter_params(index, sel, widen, min_ef)
        d, i = index.search(queries[rows], min(k, index.ntotal), params=params)
        scores[rows], ids[rows] = _fill(d, i, k)
        rows = rows[(i >= 0).sum(axis=1) < need]
        if len(rows) == 0 or (widest and kind != "hnsw"):
            return scores, ids
        widen *= WIDEN_STEP
    if len(rows):  # a graph walk that still cannot reach enough allowed vectors
        scores[rows], ids[rows] = exact_filtered(index, queries[rows], k, allowed, vectors)
    return scores, ids
