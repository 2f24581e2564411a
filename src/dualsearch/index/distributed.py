"""The IVF-PQ index built on the Spark cluster, from the Parquet shards the executors wrote.

As autofaiss builds its indexes on Spark (``autofaiss/indices/distributed.py``), with the pieces
of :mod:`.ondisk`:
  1. sample (one Spark job): each task picks the rows of a training sample the driver drew from
     its shards and writes them next to the shards; the driver trains the quantizers on them
     (:func:`.ondisk.new_trained`) and broadcasts the empty trained index (``serialize_index``);
  2. add (one Spark job): each task reads a group of shards, adds their vectors (labelled with
     their global positions) to its copy of the trained index and writes it
     (:func:`.ondisk.add_shard`); the same task scores the tuning queries exactly over those
     vectors and returns their top 10, which the driver merges into the exact neighbours;
  3. merge (driver): the tasks' inverted lists into one on-disk list file, the refine codes placed
     by position, the catalog's vector ids as labels (:func:`.ondisk.merge`); nprobe and k_factor
     tuned against the exact neighbours (:func:`.ann.tune`).
The driver never reads the vectors: it holds the training sample, the trained index and, while
merging, the refine codes. The shard folder must be a file system the driver and executors share
(the probe that runs before embedding checks that); URIs (s3://...) are built on the driver.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import ann
from .qbnorm import Bank, KnownOffsets
from .shards import read_embeddings

log = logging.getLogger(__name__)

PQ_BYTES = 32  # PQ code bytes a vector (or the largest divisor of D below): 40 B a vector with its label
TASK_ROWS = 250_000  # vectors a task adds (a group of shards): one IVF file each for the merge
SAMPLE_SUFFIX = ".sample.npy"


def pq_bytes_for(dim: int) -> int:
    """PQ code bytes a vector: :data:`PQ_BYTES`, or the largest divisor of ``dim`` below it."""
    return max(m for m in range(1, min(PQ_BYTES, dim) + 1) if dim % m == 0)


class Group:
    """One task's work: shards, the rows of each to add, their global positions and vector ids."""

    def __init__(self, number: int):
        self.number = number
        self.shards: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # (file, rows, positions, ids)

    @property
    def size(self) -> int:
        return sum(len(s[1]) for s in self.shards)


def group_shards(shard_rows: Sequence[tuple[str, np.ndarray, np.ndarray]], task_rows: int = TASK_ROWS
                 ) -> tuple[list[Group], np.ndarray]:
    """Cut the catalog's shard-referenced rows (:meth:`Catalog.shard_rows`: file, rows, vector
    ids) into task groups of about ``task_rows`` vectors, numbering positions ``0..N-1`` in order.
    -> (groups, vector ids ``[N]`` int64 by position)."""
    groups: list[Group] = []
    ids = []
    start = 0
    for name, rows, vids in shard_rows:
        if not groups or groups[-1].size >= task_rows:
            groups.append(Group(len(groups)))
        groups[-1].shards.append((name, rows, np.arange(start, start + len(rows), dtype=np.int64), vids))
        ids.append(vids)
        start += len(rows)
    return groups, (np.concatenate(ids) if ids else np.zeros(0, np.int64))


# ------------------------------------------------------------------------------- executor side
def _sample_task(items: Iterator, shards_uri: str, work: str, dim: int) -> Iterator:
    """Job 1, per group: the vectors at the sampled positions, written to ``work``."""
    for number, picks in items:  # picks: (shard file, rows) of the sample
        parts = [read_embeddings(shards_uri, name, dim)[rows] for name, rows in picks]
        vecs = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        path = os.path.join(work, f"group-{number:05d}{SAMPLE_SUFFIX}")
        np.save(path, vecs.astype(np.float32), allow_pickle=False)
        yield number, len(vecs)


def _add_task(items: Iterator, shards_uri: str, work: str, dim: int, trained, queries, k: int,
              bank=None) -> Iterator:
    """Job 2, per group: add its vectors to a copy of the trained index and write it; the exact
    top ``k`` of the tuning queries among them; with ``bank`` (query bank vectors ``[B, D]``,
    beta), the vectors' QB-Norm offsets (:func:`.qbnorm.offsets`)."""
    import faiss

    from .ondisk import add_shard
    from .qbnorm import offsets
    from .spark import peak_rss_mb

    trained, queries = getattr(trained, "value", trained), getattr(queries, "value", queries)  # Spark broadcasts
    bank = getattr(bank, "value", bank)
    for group in items:
        vecs = [read_embeddings(shards_uri, name, dim)[rows] for name, rows, _, _ in group.shards]
        vectors = np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
        positions = np.concatenate([s[2] for s in group.shards])
        t0 = time.perf_counter()
        add_shard(trained, vectors, positions, os.path.join(work, f"group-{group.number:05d}"))
        scores, at = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        ids = np.concatenate([s[3] for s in group.shards])
        hub = offsets(bank[0], vectors, bank[1]).tobytes() if bank is not None else b""
        yield (group.number, len(vectors), time.perf_counter() - t0, scores.tobytes(),
               np.where(at >= 0, ids[np.clip(at, 0, None)], -1).tobytes(), scores.shape[1], peak_rss_mb(),
               ids.tobytes(), hub)


# ---------------------------------------------------------------------------------- driver side
def _sample_picks(groups: Sequence[Group], n: int, size: int, seed: int) -> list[tuple[int, list]]:
    """The training sample drawn on the driver, as (group, [(shard file, rows)]) for the tasks."""
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = []
    for g in groups:
        picks = []
        for name, rows, positions, _ in g.shards:
            lo, hi = np.searchsorted(chosen, [positions[0], positions[-1] + 1])
            if hi > lo:
                picks.append((name, rows[chosen[lo:hi] - positions[0]]))
        out.append((g.number, picks))
    return out


def _run(rdd_fn, shards_uri: str):
    from .spark import _job_error

    try:
        return rdd_fn()
    except Exception as e:  # Py4JJavaError / PythonException: the first line names the cause
        raise _job_error(e, shards_uri) from e


def _merge_truth(results: Sequence[tuple], n_queries: int, k: int) -> np.ndarray:
    """The tasks' per-group top ``k`` merged into the exact neighbours ``[q, k]`` (vector ids)."""
    import faiss

    heap = faiss.ResultHeap(n_queries, k, keep_max=True)
    for _, _, _, scores, ids, got, *_ in results:
        heap.add_result(np.frombuffer(scores, np.float32).reshape(n_queries, got),
                        np.frombuffer(ids, np.int64).reshape(n_queries, got))
    heap.finalize()
    return heap.I


def build(spark, catalog, dim: int, out: Path, target_recall: float = 0.95, pq_bytes: int = 32,
          refine: str = "SQ8", task_rows: int = TASK_ROWS, seed: int = 0, bank: "Bank | None" = None
          ) -> ann.BuiltIndex:
    """Build the on-disk IVF-PQ index of ``catalog``'s shard-referenced vectors on Spark, into
    ``out`` (:func:`.ondisk.merge`'s files), tuned to ``target_recall`` recall@10. With ``bank``
    (:class:`.qbnorm.Bank`), the add tasks also compute every vector's QB-Norm offset, so that the
    driver never scores the collection against the bank. Returns ``ann.BuiltIndex`` (``params`` as
    :func:`.ondisk.build_local` gives them; ``seconds``: sample / train / add / merge / tune;
    ``stats["qbnorm"]``: the tasks' :class:`.qbnorm.KnownOffsets`, with ``bank``). Raises
    ``SparkIndexError`` for a failed job, ``ann.ANNError``."""
    from . import ondisk
    from .shards import absolute

    shards_uri = absolute(catalog.shards_uri)
    groups, ids = group_shards(catalog.shard_rows(), task_rows)
    n = len(ids)
    sc = spark.sparkContext
    work = os.path.join(shards_uri, f".ann-{uuid.uuid4().hex[:8]}")
    os.makedirs(work)
    seconds, t = {}, time.perf_counter()
    try:
        picks = _sample_picks(groups, n, ann.training_size("ivfpq", n), seed)
        body = functools.partial(_sample_task, shards_uri=shards_uri, work=work, dim=dim)
        _run(lambda: sc.parallelize(picks, len(picks)).mapPartitions(body).collect(), shards_uri)
        sample = np.concatenate([np.load(os.path.join(work, f"group-{g:05d}{SAMPLE_SUFFIX}")) for g, _ in picks])
        seconds["sample"], t = time.perf_counter() - t, time.perf_counter()
        trained = ondisk.new_trained(sample, n, pq_bytes, refine, seed)
        queries = ann.tuning_queries(sample, seed=seed)
        del sample
        seconds["train"], t = time.perf_counter() - t, time.perf_counter()
        import faiss

        blob, qs = sc.broadcast(faiss.serialize_index(trained)), sc.broadcast(queries)
        hub = sc.broadcast((bank.vectors, bank.beta)) if bank is not None else None
        body = functools.partial(_add_task, shards_uri=shards_uri, work=work, dim=dim, trained=blob, queries=qs, k=10,
                                 bank=hub)
        results = _run(lambda: sc.parallelize(groups, len(groups)).mapPartitions(body).collect(), shards_uri)
        blob.unpersist()
        seconds["add"], t = time.perf_counter() - t, time.perf_counter()
        task_peak = max(r[6] for r in results)  # the largest Python worker's peak RSS, MiB
        log.info("Spark: %d vectors added by %d tasks (%.1f-%.1f s each; Python workers peaked at %.0f MiB)", n,
                 len(results), min(r[2] for r in results), max(r[2] for r in results), task_peak)
        labels = None if np.array_equal(ids, np.arange(n)) else ids  # no id map (8 B + a hash entry a vector)
        path = ondisk.merge(trained, [os.path.join(work, f"group-{g.number:05d}") for g in groups], out, n, labels)
        seconds["merge"], t = time.perf_counter() - t, time.perf_counter()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    index = ann.read(path)
    params, recall = ann.tune(index, "ivfpq", queries, _merge_truth(results, len(queries), 10), target_recall)
    seconds["tune"] = time.perf_counter() - t
    params = {**params, "refine": refine, "pq_bytes": pq_bytes, "ondisk": True, "file": path.name}
    stats = {"task_peak_mb": task_peak, "tasks": len(results)}
    if bank is not None:
        stats["qbnorm"] = KnownOffsets(bank, np.concatenate([np.frombuffer(r[7], np.int64) for r in results]),
                                       np.concatenate([np.frombuffer(r[8], np.float32) for r in results]))
    return ann.BuiltIndex(index, "ivfpq", params, recall, seconds, stats)


# ------------------------------------------------------------------------------- the index job
def distributed_ann(job, n: int, kind: str, bank: Callable[[], "Bank | None"] | None = None,
                    master: str | None = None, spark=None):
    """The Spark path's IVF-PQ index, built on the cluster from the shards (:mod:`.distributed`)
    into ``job.out``, the QB-Norm offsets against ``bank()`` computed by its tasks; None (the
    driver builds it from the catalog, :func:`ann.build_stream`) for other kinds, a collection too
    small for IVF-PQ, vectors the catalog stores itself, or shards under a URI (the tasks write
    their parts to a shared file system)."""
    from . import ondisk
    from .spark import spark_session

    uri = job.catalog.shards_uri
    shard_held = sum(c for c, _ in job.catalog.shard_refs().values()) if kind == "ivfpq" else 0
    if kind != "ivfpq" or n < max(2000, ondisk.MIN_VECTORS) or not uri or "://" in uri or shard_held != n \
            or not os.access(uri, os.W_OK):
        if kind == "ivfpq" and n >= 2000:
            log.info("IVF-PQ index built on the driver: %s", "the shards are under a URI" if uri and "://" in uri
                     else "some vectors are not in Parquet shards" if shard_held != n
                     else f"the tasks cannot write their parts under {uri}")
        return None
    session = spark or spark_session(master)
    built = build(session, job.catalog, job.dim, job.out, pq_bytes=pq_bytes_for(job.dim),
                  bank=bank() if bank is not None else None)
    log.info("IVF-PQ index built on Spark: %s; recall@10 %.3f", ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                        built.seconds.items()), built.recall)
    return built
