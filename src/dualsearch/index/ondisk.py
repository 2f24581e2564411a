"""IVF-PQ indexes built shard by shard and merged into one on-disk index (FAISS ``OnDiskInvertedLists``).

The distributed build autofaiss runs on Spark, with FAISS's own pieces:
  1. :func:`new_trained` (driver, or one executor): an empty IVF-PQ (+ refine codes) index, its
     quantizers trained on a sample; it is broadcast as ``faiss.serialize_index`` bytes;
  2. :func:`add_shard` (one task per shard): a copy of the trained IVF gets the shard's vectors,
     labelled with their global positions ``0..N-1``, and is written as ``PREFIX.ivf`` beside the
     shard's refine codes ``PREFIX.refine.npy``;
  3. :func:`merge` (driver): the shards' inverted lists, memory-mapped (``IO_FLAG_MMAP``), are merged
     into one ``OnDiskInvertedLists`` file (``merge_from_multiple``, as ``faiss/contrib/ondisk.py``'s
     ``merge_ondisk``), the refine codes placed by position, and the index written beside it.
:func:`build_local` runs the same three steps in one process. ``ann.read`` opens the result with the
inverted lists and the refine codes memory-mapped, so resident memory at query time is the coarse
quantizer plus the pages searched (the PQ codes and ids of the probed lists, the refine codes of
the candidates re-ranked).

Layout of an index folder: ``vectors.faiss`` (quantizers, list offsets, refine codes, id map) and
``vectors.faiss.<token>.ivfdata`` (the inverted lists: PQ codes and int64 labels). The token is new
at each merge, so a reader never pairs an index file with another merge's list data; ``ann.read``
looks the list file up in the index file's own folder, so the folder can be moved.

Why classic PQ (``PQ{m}x8``) and not the fast-scan codes ``ann.new_index`` uses: fast-scan keeps its
lists in ``BlockInvertedLists`` (codes packed 32 vectors to a block, ``code_size`` undefined), which
``OnDiskInvertedLists.merge_from_multiple`` refuses (its ``code_size`` check fails, faiss 1.15.1).

Sources: autofaiss's distributed build (``autofaiss/indices/distributed.py``: train once, add per
partition, ``merge_ondisk``); ``faiss/contrib/ondisk.py``; FAISS wiki, "Indexes that do not fit in
RAM" (``OnDiskInvertedLists``, ``IO_FLAG_MMAP``); ``faiss/invlists/OnDiskInvertedLists.cpp``.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from ..storage import atomic_path
from . import ann
from .manifest import ANN_FILE

log = logging.getLogger(__name__)

REFINES = ("SQ8", "SQfp16", "none")
IVF_SUFFIX = ".ivf"
CODES_SUFFIX = ".refine.npy"
IVFDATA_SUFFIX = ".ivfdata"


# ------------------------------------------------------------------------------ the trained index
def new_trained(sample: np.ndarray, n_total: int, pq_bytes: int = 32, refine: str = "SQ8",
                seed: int = 0) -> faiss.Index:
    """An EMPTY, trained inner-product index for ``n_total`` vectors: ``IndexRefine(base=IndexIVFPQ,
    refine_index=IndexScalarQuantizer)``, or the bare ``IndexIVFPQ`` with ``refine="none"``.

    ``sample [m, D] float32`` unit vectors to train on (``ann.training_size("ivfpq", n)`` of them:
    >= 39 per list). nlist = ``ann.ivf_lists(n_total)``, an HNSW coarse quantizer past
    ``ann.HNSW_COARSE_MIN`` vectors (as ``ann.new_index``); ``pq_bytes`` sub-quantizers of 8 bits
    (``pq_bytes`` bytes a vector in the lists, plus an 8-byte label); ``refine``: "SQ8" (D bytes a
    vector) or "SQfp16" (2D) codes that re-rank the candidates, or "none". ``seed``: k-means seeds.
    Raises ``ann.ANNError`` for a bad shape, ``refine`` or ``pq_bytes`` (it must divide D)."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ann.ANNError(f"training sample must be a non-empty [m, D] array, got shape {sample.shape}")
    dim = sample.shape[1]
    if refine not in REFINES:
        raise ann.ANNError(f"unknown refine codes {refine!r}: choose one of {', '.join(REFINES)}")
    if pq_bytes <= 0 or dim % pq_bytes:
        raise ann.ANNError(f"pq_bytes {pq_bytes} must divide the dimension {dim}")
    coarse = f"IVF{ann.ivf_lists(n_total)}" + ("_HNSW32" if n_total > ann.HNSW_COARSE_MIN else "")
    spec = f"{coarse},PQ{pq_bytes}x8" + (f",Refine({refine})" if refine != "none" else "")
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivfpq = faiss.downcast_index(ivf)
    ivfpq.pq.cp.seed = seed
    ivfpq.do_polysemous_training = False  # the factory's default; its codes order serves only Hamming filtering
    if len(sample) < 39 * 256:  # FAISS warns once per sub-quantizer (32 lines); say it once
        log.info("PQ trained on %d vectors (FAISS advises %d for 256 centroids a sub-quantizer)", len(sample), 39 * 256)
        ivfpq.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    return index


def _load(trained: faiss.Index | bytes | np.ndarray) -> faiss.Index:
    """A private copy of the trained index (from ``faiss.serialize_index`` bytes or an index)."""
    if isinstance(trained, faiss.Index):
        trained = faiss.serialize_index(trained)
    try:
        return faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ann.ANNError(f"not a serialized FAISS index ({str(e).splitlines()[0]})") from e


def _parts(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """``(the IVF-PQ index, the refine code store or None)`` of a :func:`new_trained` index."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
    if isinstance(index, faiss.IndexIVF):
        return index, None
    raise ann.ANNError(f"expected an IVF index (from new_trained), got {type(index).__name__}")


def _codes_dtype(code_size: int) -> np.dtype:
    """The records of ``PREFIX.refine.npy``: a global position, and the refine code when there is one."""
    return np.dtype([("pos", "<i8")] + ([("code", "u1", (code_size,))] if code_size else []))


# ------------------------------------------------------------------------------- one shard (a task)
def add_shard(trained: faiss.Index | bytes, vectors: np.ndarray, positions: np.ndarray,
              prefix: str | os.PathLike) -> int:
    """Add one shard to a copy of ``trained`` and write it: what one Spark task runs (numpy and
    faiss only, no torch).

    ``trained``: the :func:`new_trained` index or its ``faiss.serialize_index`` bytes (a broadcast);
    ``vectors [n, D] float32`` unit vectors; ``positions [n] int64``: their global positions in
    ``0..N-1``, the labels of the merged index. Writes ``PREFIX.ivf`` (the IVF-PQ index holding only
    this shard's lists, via ``ann.write``) and ``PREFIX.refine.npy`` (one record a vector: ``pos``
    int64 and, unless ``refine="none"``, ``code`` uint8 [code_size]), each atomically. Returns the
    bytes written. Raises ``ann.ANNError`` for bad shapes or positions, ``StorageError`` when the
    files cannot be written."""
    index = _load(trained)
    ivf, refine = _parts(index)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    positions = np.ascontiguousarray(positions, dtype=np.int64).ravel()
    if vectors.ndim != 2 or vectors.shape[1] != ivf.d or len(vectors) != len(positions):
        raise ann.ANNError(f"shard of shape {vectors.shape} with {len(positions)} positions does not fit "
                           f"an index of dimension {ivf.d}")
    if len(positions) and positions.min() < 0:
        raise ann.ANNError(f"negative position {positions.min()} in shard {prefix}")
    ivf.add_with_ids(vectors, positions)
    records = np.empty(len(positions), _codes_dtype(refine.code_size if refine is not None else 0))
    records["pos"] = positions
    if refine is not None:
        records["code"] = refine.sa_encode(vectors)
    prefix = str(prefix)
    ann.write(ivf, prefix + IVF_SUFFIX)
    with atomic_path(prefix + CODES_SUFFIX) as tmp, open(tmp, "wb") as f:
        np.save(f, records, allow_pickle=False)
    return os.path.getsize(prefix + IVF_SUFFIX) + os.path.getsize(prefix + CODES_SUFFIX)


# ---------------------------------------------------------------------------------- merge (driver)
def _open_shard(prefix: str, ivf: faiss.Index, code_size: int) -> tuple[faiss.InvertedLists, np.ndarray]:
    """One shard's inverted lists (memory-mapped, ``IO_FLAG_MMAP``; its quantizers are checked
    against the trained ``ivf``, then dropped) and its records (memory-mapped)."""
    try:
        shard = faiss.read_index(prefix + IVF_SUFFIX, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        shard_ivf = faiss.downcast_index(faiss.extract_index_ivf(shard))
    except RuntimeError as e:
        raise ann.ANNError(f"shard {prefix}{IVF_SUFFIX}: missing or damaged ({str(e).splitlines()[0]})") from e
    same = (isinstance(shard_ivf, faiss.IndexIVFPQ) and shard_ivf.nlist == ivf.nlist and shard_ivf.d == ivf.d
            and shard_ivf.code_size == ivf.code_size
            and np.array_equal(faiss.vector_to_array(shard_ivf.pq.centroids), faiss.vector_to_array(ivf.pq.centroids)))
    if not same:
        raise ann.ANNError(f"shard {prefix}{IVF_SUFFIX} was not built from this trained index")
    try:
        records = np.load(prefix + CODES_SUFFIX, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ann.ANNError(f"shard {prefix}{CODES_SUFFIX}: missing or damaged ({e})") from e
    if records.dtype != _codes_dtype(code_size) or records.ndim != 1 or len(records) != shard.ntotal:
        raise ann.ANNError(f"shard {prefix}{CODES_SUFFIX} does not match {prefix}{IVF_SUFFIX} "
                           f"({len(records)} records of {records.dtype}, {shard.ntotal} vectors)")
    lists = shard_ivf.invlists
    shard_ivf.own_invlists = False  # as merge_ondisk: the lists outlive the index (its quantizer is freed)
    return lists, records


def _free(lists: faiss.InvertedLists) -> None:
    """Free lists that :func:`_open_shard` detached (unmapping the shard file): through an IVF
    index's C++ destructor, since handing their ownership to Python (``thisown``) corrupts
    faiss 1.15.1's SWIG state when they are deleted (``merge_ondisk`` leaks them instead)."""
    holder = faiss.IndexIVFFlat(faiss.IndexFlatIP(1), 1, lists.nlist)
    holder.code_size = lists.code_size
    holder.replace_invlists(lists, True)


def _cover(seen: np.ndarray, pos: np.ndarray, prefix: str) -> None:
    """Mark ``pos`` in ``seen`` (bool [ntotal]); raise ``ANNError`` for a position out of range or
    seen before (in this shard or an earlier one)."""
    if len(pos) == 0:
        return
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= len(seen):
        raise ann.ANNError(f"shard {prefix} holds position {lo if lo < 0 else hi}, outside 0..{len(seen) - 1}")
    hit = seen[pos]
    ordered = np.sort(pos)
    again = ordered[1:][ordered[1:] == ordered[:-1]]
    if hit.any() or len(again):
        raise ann.ANNError(f"position {int(pos[hit][0] if hit.any() else again[0])} is held twice (shard {prefix})")
    seen[pos] = True


def _check_shards(prefixes: Sequence, ivf: faiss.Index, code_size: int, ntotal: int, shards: list) -> None:
    """Every shard opened and checked, appending ``(its lists, its records)`` to ``shards``; their
    positions must cover ``0..ntotal-1`` exactly once."""
    seen = np.zeros(ntotal, dtype=bool)
    for prefix in map(str, prefixes):
        lists, records = _open_shard(prefix, ivf, code_size)
        shards.append((lists, records))
        _cover(seen, np.asarray(records["pos"]), prefix)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise ann.ANNError(f"the shards hold {ntotal - len(missing)} of {ntotal} positions; "
                           f"{len(missing)} missing, the first {int(missing[0])}")


def _place_codes(refine: faiss.Index, shards: list, ntotal: int, block: int = 1 << 16) -> None:
    """The refine codes of every shard written at their positions into ``refine``'s code array
    (``ntotal x code_size`` bytes, allocated once)."""
    cs = refine.code_size
    refine.codes.resize(ntotal * cs)
    view = faiss.rev_swig_ptr(refine.codes.data(), ntotal * cs).reshape(ntotal, cs)
    for _, records in shards:
        for s in range(0, len(records), block):
            part = records[s:s + block]
            view[part["pos"]] = part["code"]
    refine.ntotal = ntotal


@contextlib.contextmanager
def _quiet_stdout():
    """The C library's stdout (file descriptor 1) sent to /dev/null for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _merge_lists(ivf: faiss.Index, shards: list, path: Path) -> int:
    """``merge_ondisk``'s steps: the shards' lists merged into ``OnDiskInvertedLists`` at ``path``,
    which replace ``ivf``'s (empty) lists. Returns the vectors merged."""
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    vector = faiss.InvertedListsPtrVector()
    for lists_of_shard, _ in shards:
        vector.push_back(lists_of_shard)
    with _quiet_stdout():  # OnDiskInvertedLists prints "resizing FILE to N bytes" with printf
        merged = lists.merge_from_multiple(vector.data(), vector.size(), False, False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = merged
    return merged


def merge(trained: faiss.Index | bytes, prefixes: Sequence, out_dir: str | os.PathLike, ntotal: int,
          ids: np.ndarray | None = None, name: str = ANN_FILE) -> Path:
    """Merge the shards written by :func:`add_shard` (``prefixes``) into one on-disk index in
    ``out_dir``; returns the index file's path (``out_dir/name``; its inverted lists in
    ``out_dir/name.<token>.ivfdata``, which replaces that of an earlier merge).

    ``trained``: the index the shards were built from (or its serialized bytes); ``ntotal``: N, the
    shards' positions must cover ``0..N-1`` exactly once; ``ids [N] int64`` (optional, unique): the
    external id of each position (catalog vector ids), kept in an ``IndexIDMap`` (8 bytes a vector,
    in RAM when opened; not ``IndexIDMap2``, whose reverse hash map costs another ~51 bytes a
    vector measured at 1M: search never needs it, and ``ann.search`` reconstructs the refine codes
    of sorted ids by binary search); without them the labels are the positions. Open the result with ``ann.read``.

    Peak memory: the refine codes (N x code_size bytes: D for SQ8, 2D for SQfp16) assembled in RAM
    once, as FAISS must hold them to write ``IndexScalarQuantizer`` (a view on a memory-mapped file
    would stream them, but ``MaybeOwnedVector.create_view`` needs a C++ ``shared_ptr`` owner that
    faiss 1.15.1's Python bindings cannot make); a bool per vector to check the positions; ``ids``
    (and FAISS's copy); the trained quantizers once. The shards' lists and codes are memory-mapped
    (page cache, not resident), each shard's quantizer freed once checked.
    Raises ``ann.ANNError`` (one line) for a missing or damaged shard, a shard built from another
    trained index, or positions that are missing, repeated or out of range; ``StorageError`` when
    the files cannot be written."""
    index = _load(trained)
    if index.ntotal:
        raise ann.ANNError("merge needs the empty trained index, not a filled one")
    ivf, refine = _parts(index)
    if ids is not None:
        ids = np.ascontiguousarray(ids, dtype=np.int64).ravel()
        if len(ids) != ntotal or len(np.unique(ids)) != ntotal:
            raise ann.ANNError(f"ids must be {ntotal} distinct integers, got {len(ids)} "
                               f"({len(np.unique(ids))} distinct)")
    top = faiss.IndexIDMap(faiss.downcast_index(index)) if ids is not None else index  # it wraps an empty index
    out = Path(out_dir) / name
    ivfdata = out.with_name(f"{name}.{secrets.token_hex(4)}{IVFDATA_SUFFIX}")
    shards: list = []
    try:
        _check_shards(prefixes, ivf, refine.code_size if refine is not None else 0, ntotal, shards)
        with atomic_path(ivfdata) as tmp:
            if _merge_lists(ivf, shards, tmp) != ntotal:
                raise ann.ANNError(f"the shards' lists hold {ivf.ntotal} vectors; {ntotal} expected")
        if refine is not None:
            _place_codes(refine, shards, ntotal)
    finally:
        for lists, _ in shards:
            _free(lists)
    faiss.downcast_InvertedLists(ivf.invlists).filename = str(ivfdata)
    index.ntotal = ntotal
    if ids is not None:
        faiss.copy_array_to_vector(ids, top.id_map)
        top.ntotal = ntotal
    try:
        ann.write(top, out)
    except BaseException:
        ivfdata.unlink(missing_ok=True)  # the index file it was made for was not written
        raise
    for old in out.parent.glob(f"{glob.escape(name)}.*{IVFDATA_SUFFIX}"):  # earlier merges' lists
        if old != ivfdata:
            old.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------- the one-node route
MIN_VECTORS = 1000  # 8-bit PQ trains 256 centroids per sub-quantizer


def _positional(batches: ann.Batches) -> ann.Batches:
    """The same blocks, labelled with their positions in the stream instead of their ids."""
    def gen():
        start = 0
        for _, vecs in batches():
            yield np.arange(start, start + len(vecs), dtype=np.int64), vecs
            start += len(vecs)
    return gen


def _add_all(trained: bytes, batches: ann.Batches, n: int, folder: Path, shard_rows: int
             ) -> tuple[list[str], np.ndarray]:
    """:func:`add_shard` over groups of blocks of >= ``shard_rows`` vectors: ``(prefixes, the
    stream's ids [n])``."""
    prefixes, ids = [], np.empty(n, np.int64)
    held: list[np.ndarray] = []
    start = done = 0

    def flush():
        nonlocal done, held
        if held:
            vecs = np.concatenate(held)
            prefixes.append(str(folder / f"shard-{len(prefixes):05d}"))
            add_shard(trained, vecs, np.arange(done, done + len(vecs), dtype=np.int64), prefixes[-1])
            done, held = done + len(vecs), []

    for bids, vecs in batches():
        if start + len(vecs) > n:
            raise ann.ANNError(f"the vector source gave more than the {n} vectors expected")
        ids[start:start + len(vecs)] = bids
        held.append(np.asarray(vecs, dtype=np.float32))
        start += len(vecs)
        if start - done >= shard_rows:
            flush()
    flush()
    if start != n:
        raise ann.ANNError(f"the vector source gave {start} vectors; {n} expected")
    return prefixes, ids


def build_local(batches: ann.Batches, n: int, dim: int, out_dir: str | os.PathLike, shard_rows: int = 250_000,
                pq_bytes: int = 32, refine: str = "SQ8", target_recall: float = 0.95,
                ids: np.ndarray | None = None, seed: int = 0) -> ann.BuiltIndex:
    """Build an on-disk IVF-PQ index in ``out_dir`` on one node, with the functions the Spark path
    runs (:func:`new_trained`, :func:`add_shard` per group of blocks, :func:`merge`), and tune it.

    ``batches``: the ``n`` unit vectors of dimension ``dim`` as (ids, vectors [b, D] float32)
    blocks, read in four passes (sample, add, exact neighbours of the tuning queries); the shards
    go to a temporary folder under ``out_dir``, removed afterwards. ``ids [n]``: the external id of
    each position; None: the ids the blocks carry (no id map when those are ``0..n-1``). The
    index is opened memory-mapped (``ann.read``) and nprobe / k_factor tuned (``ann.tune``) for
    ``target_recall`` recall@10 against exact search. Returns ``ann.BuiltIndex`` (kind "ivfpq";
    ``params`` hold the search parameters, ``refine``, ``pq_bytes``, ``ondisk`` and ``file``, the
    index file's name in ``out_dir``; ``seconds``: train / add / merge / tune). Raises
    ``ann.ANNError`` for fewer than ``MIN_VECTORS`` vectors or a source that does not give ``n``."""
    if n < MIN_VECTORS:
        raise ann.ANNError(f"an on-disk IVF-PQ index needs at least {MIN_VECTORS} vectors; {n} given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds, t = {}, time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = ann._gather(batches, np.sort(rng.choice(n, size=ann.training_size("ivfpq", n), replace=False)), dim)
    trained = faiss.serialize_index(new_trained(sample, n, pq_bytes, refine, seed))
    seconds["train"], t = time.perf_counter() - t, time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=".shards-", dir=out_dir))
    try:
        prefixes, stream_ids = _add_all(trained, batches, n, folder, shard_rows)
        seconds["add"], t = time.perf_counter() - t, time.perf_counter()
        ids = stream_ids if ids is None else np.asarray(ids, dtype=np.int64)
        if np.array_equal(ids, np.arange(n)):
            ids = None
        path = merge(trained, prefixes, out_dir, n, ids)
        seconds["merge"], t = time.perf_counter() - t, time.perf_counter()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    index = ann.read(path)
    queries = ann.tuning_queries(sample, seed=seed)
    del sample
    _, truth = ann.exact_knn(queries, _positional(batches), 10)
    truth = truth if ids is None else np.where(truth >= 0, ids[np.clip(truth, 0, None)], -1)
    params, recall = ann.tune(index, "ivfpq", queries, truth, target_recall)
    seconds["tune"] = time.perf_counter() - t
    params = {**params, "refine": refine, "pq_bytes": pq_bytes, "ondisk": True, "file": path.name}
    return ann.BuiltIndex(index, "ivfpq", params, recall, seconds)
