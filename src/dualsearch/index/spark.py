"""The Spark runner: embed a plan's parts on Apache Spark, then ingest the Parquet shards written.

The plan (:mod:`.plan`: list, diff against the catalog, cut into parts named by a hash of what
they hold and of the model) is made on the driver; a re-run cuts the same parts and skips those
whose Parquet shard exists (resume at shard granularity, as img2dataset's incremental mode).
Spark runs one task per part (``mapInArrow``); each Python worker loads the image encoder once,
an ONNX export shipped with ``SparkContext.addFile``, so executors need only numpy, Pillow,
pyarrow and ONNX Runtime at run time. A task writes its shard
(paths, sizes, mtimes, statuses, skip reasons, unit vectors) to a temporary name and renames it
into place, so a retried or speculative task never leaves half a shard or a duplicate.

The driver then ingests the shards into the catalog in plan order, one transaction per shard,
and builds the ANN index from the catalog block by block (:func:`ann.build_stream`): the same
INDEX layout as the local path, so ``search`` and ``serve`` work unchanged.

This module imports neither torch nor the model at the top: executors unpickle
:func:`_embed_parts` from it, and need only :data:`EXECUTOR_PACKAGES` (tests/test_spark.py runs the
executor side with every other dependency blocked). Before embedding, :func:`probe_executors` runs
one tiny task per core that checks the executors' Python, the shard folder and the images.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..data.images import ImageLoadError, fetch_uri, is_uri, load_image
from ..data.readers.webdataset import scan_shard
from ..data.records import ImageRef, SkipLog, display_name
from ..encode.runtime import ort_session
from ..errors import DualsearchError
from ..storage import os_reason
from .catalog import IndexedFile, SkippedFile
from .plan import PART_META, SHARD_PREFIX, TAR_META, Part, Plan, io_skip, make_parts
from .shards import absolute, filesystem, read_batches

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000
# what the executor side imports besides the standard library and pyspark: an executor install is
# dualsearch without its dependencies plus these (scripts/pack_executor_env.sh; never torch); faiss
# for the tasks that build the IVF-PQ index (:mod:`.distributed`)
EXECUTOR_PACKAGES = ("numpy", "pillow", "pyarrow", "onnxruntime", "faiss-cpu")
EMBEDDINGS_DIR = "embeddings"


class SparkIndexError(DualsearchError):
    """A Spark run that cannot start or finish (its finished shards are kept for the next run)."""


# ----------------------------------------------------------------------------- storage (local or URI)
_fs = filesystem


def done_parts(out_uri: str) -> set[str]:
    """File names of the finished shards under ``out_uri`` (temporary files are not)."""
    from pyarrow import fs

    filesystem, root = _fs(out_uri)
    try:
        filesystem.create_dir(root, recursive=True)
        infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    except Exception as e:  # OSError / ArrowInvalid: a file in the way, no permission, no bucket
        raise SparkIndexError(f"{out_uri}: cannot keep the shards there ({str(e).splitlines()[0]})") from e
    return {os.path.basename(i.path) for i in infos
            if i.type == fs.FileType.File and i.path.endswith(".parquet")
            and os.path.basename(i.path).startswith(SHARD_PREFIX)}


# ----------------------------------------------------------------------------- the executor side
_ENCODERS: dict = {}


def _encoder(path: str, threads: int):
    """One ONNX Runtime session per Python worker and encoder file (Spark reuses workers)."""
    key = (path, threads)
    if key not in _ENCODERS:
        _ENCODERS[key] = ort_session(path, threads, gpu=True)
    return _ENCODERS[key]


def _part_items(part_kind: str, items: list) -> tuple[list, list]:
    """-> ([(name, size, mtime_ns, source)], [(name, size, mtime_ns, reason)]) for a part."""
    if part_kind == "files":
        return [(p, s, m, p) for p, s, m in items], []
    (shard, size, mtime), = items
    refs: dict[str, ImageRef] = {}
    skipped = SkipLog()
    scan_shard(shard, OrderedDict(), refs, skipped)
    good = [(r.name, r.size, mtime, r) for r in refs.values()]
    return good, [(name, 0, mtime, reason) for name, reason in skipped.entries]


def _decode(source, preprocess, max_pixels: int | None):
    """-> (pixels [3,S,S], None) or (None, reason)."""
    try:
        if isinstance(source, str) and is_uri(source):
            source = fetch_uri(source)
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        return preprocess.array(load_image(source, target_size=preprocess.size, **kwargs)), None
    except ImageLoadError as e:
        return None, e.reason
    except Exception as e:  # a decoder bug on one file must not fail the whole part
        return None, f"cannot decode ({type(e).__name__}: {e})"


def embed_part(part_kind: str, items: list, encoder, preprocess, batch_size: int = 64,
               max_pixels: int | None = None, threads: int = 1):
    """Embed one part. -> a pyarrow Table (path, size, mtime_ns, status, reason, embedding)."""
    import pyarrow as pa

    todo, bad = _part_items(part_kind, items)
    rows: list[tuple] = [(n, s, m, "skipped", r, None) for n, s, m, r in bad]
    dim = None
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            decoded = list(pool.map(lambda t: _decode(t[3], preprocess, max_pixels), batch))
            ok = [i for i, (px, _) in enumerate(decoded) if px is not None]
            vecs = encoder.run(None, {"pixels": np.stack([decoded[i][0] for i in ok])})[0] if ok else None
            if vecs is not None:
                dim = vecs.shape[1]
            good = dict(zip(ok, vecs)) if ok else {}
            for i, (name, size, mtime, _) in enumerate(batch):
                if i in good:
                    rows.append((name, size, mtime, "indexed", None, good[i].astype(np.float32)))
                else:
                    rows.append((name, size, mtime, "skipped", decoded[i][1], None))
    dim = dim or int(encoder.get_outputs()[0].shape[1] or 0)
    emb = pa.array([r[5] for r in rows], type=pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32()))
    return pa.table({
        # file-system bytes: a name that is not UTF-8 (b"caf\\xe9.jpg") survives Parquet losslessly
        "path": pa.array([os.fsencode(r[0]) for r in rows], pa.binary()),
        "size": pa.array([r[1] for r in rows], pa.int64()),
        "mtime_ns": pa.array([r[2] for r in rows], pa.int64()),
        "status": pa.array([r[3] for r in rows], pa.string()),
        "reason": pa.array([None if r[4] is None else display_name(r[4]) for r in rows], pa.string()),
        "embedding": emb,
    })


def write_shard(table, out_uri: str, file_name: str) -> None:
    """Write to a unique temporary name, then rename into place (atomic on POSIX and HDFS; a
    copy-then-delete on object stores, where a reader never sees a partial object either)."""
    import pyarrow.parquet as pq

    filesystem, root = _fs(out_uri)
    tmp = f"{root}/.{file_name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp, filesystem=filesystem)
    filesystem.move(tmp, f"{root}/{file_name}")


def _embed_parts(batches: Iterator, encoder_file: str, preprocess, out_uri: str, batch_size: int,
                 max_pixels: int | None) -> Iterator:
    """``mapInArrow`` body: each input row is one part; each output row says what it wrote."""
    import pyarrow as pa
    from pyspark import SparkFiles, TaskContext

    ctx = TaskContext.get()
    threads = max(1, int(ctx.cpus())) if ctx is not None else 1
    local = encoder_file if os.path.isfile(encoder_file) else SparkFiles.get(os.path.basename(encoder_file))
    encoder = _encoder(local, threads)
    for batch in batches:
        out = []
        cols = batch.to_pydict()
        for name, kind, items in zip(cols["part"], cols["kind"], cols["items"]):
            t0 = time.perf_counter()
            table = embed_part(kind, json.loads(items), encoder, preprocess, batch_size, max_pixels, threads)
            write_shard(table, out_uri, f"{SHARD_PREFIX}{name}.parquet")
            indexed = sum(1 for s in table.column("status").to_pylist() if s == "indexed")
            unreadable = sum(1 for r in table.column("reason").to_pylist() if io_skip(r))
            out.append((name, indexed, table.num_rows - indexed, unreadable, time.perf_counter() - t0,
                        peak_rss_mb()))
        arrow = {"string": pa.string(), "long": pa.int64(), "double": pa.float64()}
        schema = pa.schema([(name, arrow[kind]) for name, kind in STATS])
        yield pa.RecordBatch.from_pylist([dict(zip(schema.names, o)) for o in out], schema=schema)


# what each task reports, in Spark's type names: the mapInArrow schema and its Arrow batches
STATS = (("part", "string"), ("indexed", "long"), ("skipped", "long"), ("unreadable", "long"),
         ("seconds", "double"), ("worker_peak_mb", "double"))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux's VmHWM: unlike ru_maxrss, not inherited
    from the parent at fork), for sizing executors; 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ----------------------------------------------------------------------------- the probe (one tiny job)
def _unreadable(path: str) -> str | None:
    """Why this process cannot read the first byte of a local file; None when it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return os_reason(e)
    return None


def probe_here(out_uri: str, marker: str, samples: Sequence[str], index: int) -> dict:
    """What one probe task finds where it runs: whether it sees the ``marker`` file the driver
    wrote under ``out_uri`` (a node-local folder does not), whether it can write there, and which
    ``samples`` (local image paths the driver reads) it cannot read, with why."""
    from pyarrow import fs

    found: dict = {"write": None, "sees_marker": False, "unreadable": []}
    try:
        filesystem, root = _fs(out_uri)
        found["sees_marker"] = filesystem.get_file_info(f"{root}/{marker}").type == fs.FileType.File
        tmp = f"{root}/{marker}-{index}-{uuid.uuid4().hex}"
        with filesystem.open_output_stream(tmp) as f:
            f.write(b"probe")
        filesystem.delete_file(tmp)
    except Exception as e:  # OSError, ArrowInvalid, SparkIndexError: the reason is the answer
        found["write"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    found["unreadable"] = [(p, why) for p in samples if (why := _unreadable(p))]
    return found


def _probe_task(out_uri: str, marker: str, samples: list[str]):
    """The function a probe task runs: a closure, so Spark ships its code by value and it runs
    (and says what is missing) even on executors whose Python cannot import this package."""
    def probe(index, _rows):
        import json
        import socket
        import sys

        row = {"host": socket.gethostname(), "python": sys.executable}
        try:
            import onnxruntime  # noqa: F401

            from dualsearch.index import spark as executor_side
        except Exception as e:  # ImportError, or a broken install's own error
            return [json.dumps({**row, "missing": f"{type(e).__name__}: {e}"})]
        return [json.dumps({**row, **executor_side.probe_here(out_uri, marker, samples, index)})]
    return probe


PYTHON_HINT = ("give --executor-python (PYSPARK_PYTHON) a Python with dualsearch's executor install on every "
               "worker, or ship a packed environment (README: On a real cluster)")
SHARED_HINT = ("give --embeddings a folder every executor can write and this machine can read under the same "
               "path (a shared mount), or an s3://, gs://, hdfs:// URI")
VISIBILITY_HINT = ("put the images where every executor reads them under the same path as this machine "
                   "(a shared mount at the same place, or object-storage URIs)")


def _cause(e: BaseException) -> str:
    """The line of a Spark job's error (Py4JJavaError, PythonException) that names the cause."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[0] if lines
                 else type(e).__name__)
    return cause[:300]


def _spread(parts: Sequence[Part], n: int = 16) -> list[str]:
    """Up to ``n`` local inputs (files, tar shards) of ``parts``, spread over them."""
    paths = [item[0] for part in parts for item in part.items if "://" not in item[0]]
    return paths[::max(1, len(paths) // n)][:n]


def _probe_samples(parts: Sequence[Part], n: int = 16) -> list[str]:
    """Up to ``n`` local inputs of ``parts``, spread over them, that this machine can read."""
    return [p for p in _spread(parts, n) if _unreadable(p) is None]


def probe_executors(spark, out_uri: str, samples: Sequence[str]) -> None:
    """Run one tiny task per core (at most 16) before any embedding: the executors' Python must
    import the executor side, write under ``out_uri`` and see what the driver wrote there, and read
    most ``samples``. Raises :class:`SparkIndexError` (one line, no re-run advice) when not."""
    filesystem, root = _fs(out_uri)
    marker = f".probe-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(f"{root}/{marker}") as f:
            f.write(b"written by the driver")
    except OSError as e:  # read-only, immutable, no permission, full
        raise SparkIndexError(f"cannot write the shards under --embeddings {out_uri} ({os_reason(e)}); give a "
                              f"folder this machine and the executors can write") from e
    sc = spark.sparkContext
    n = max(1, min(int(sc.defaultParallelism), 16))
    try:
        rows = [json.loads(r) for r in sc.parallelize(range(n), n)
                .mapPartitionsWithIndex(_probe_task(out_uri, marker, list(samples))).collect()]
    except Exception as e:  # the executors' Python does not start, or is another version than the driver's
        raise SparkIndexError(f"the executors cannot run Python {sc.pythonExec} ({_cause(e)}); {PYTHON_HINT}") from e
    finally:
        filesystem.delete_file(f"{root}/{marker}")
    _check_probe(rows, out_uri, samples)


def _check_probe(rows: list[dict], out_uri: str, samples: Sequence[str]) -> None:
    """The first problem the probe tasks found, as one :class:`SparkIndexError`."""
    for r in rows:
        where = f"{r['python']} on {r['host']}"
        if r.get("missing"):
            raise SparkIndexError(f"the executors' Python ({where}) cannot import dualsearch's executor side "
                                  f"({r['missing']}); {PYTHON_HINT}")
        if not r["sees_marker"]:
            raise SparkIndexError(f"{out_uri} is not the same folder on the executors as here ({r['host']} does not "
                                  f"see a file this machine wrote there: a node-local folder?); {SHARED_HINT}")
        if r["write"]:
            raise SparkIndexError(f"the executors cannot write the shards under {out_uri} ({r['host']}: "
                                  f"{r['write']}); {SHARED_HINT}")
        if samples and len(r["unreadable"]) > len(samples) / 2:
            path, why = r["unreadable"][0]
            raise SparkIndexError(f"the executors cannot read the images this machine reads ({len(r['unreadable'])} "
                                  f"of {len(samples)} sampled; {r['host']}: {path}: {why}); {VISIBILITY_HINT}")


# ----------------------------------------------------------------------------- the driver side
def spark_session(master: str | None = None, app_name: str = "dualsearch-index"):
    """The active session (when ``master`` is None or its own), or a new one on ``master``
    (default: ``DUALSEARCH_SPARK_MASTER``, else ``local[*]``; under spark-submit, its master and
    settings). Executors run ``PYSPARK_PYTHON`` (``--executor-python``), else this interpreter (on a
    cluster, the same path on every worker: :func:`probe_executors` says so when it is not).
    The Spark UI is off in local mode only. Raises :class:`SparkIndexError` (no Java, no master)."""
    import sys

    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and master in (None, active.sparkContext.master):
        if master is not None and os.environ.get("PYSPARK_PYTHON"):  # --executor-python, for this run's jobs
            active.sparkContext.pythonExec = os.environ["PYSPARK_PYTHON"]
        return active
    builder = SparkSession.builder.appName(app_name)
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        master = "spark-submit's"  # launched by spark-submit: its --master, --conf and PYSPARK_PYTHON hold
    else:
        master = master or os.environ.get("DUALSEARCH_SPARK_MASTER") or "local[*]"
        builder = builder.master(master)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # read by pyspark when the context starts
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        log4j = Path(__file__).with_name("log4j2.properties")
        builder = builder.config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
        builder = builder.config("spark.ui.enabled", "false")  # no web UI port for a run on this machine
    elif master != "spark-submit's":  # said explicitly: a local session earlier in this JVM leaves "false" behind
        builder = builder.config("spark.ui.enabled", "true")
    builder = builder.config("spark.ui.showConsoleProgress", "true")
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # no java, a master that does not answer
        raise SparkIndexError(f"cannot start Spark on {master}: {str(e).splitlines()[0]}") from e
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# errors that running the same command again cannot fix: the executors' install, rights, memory
CONFIG_ERRORS = ("ModuleNotFoundError", "ImportError", "Cannot run program", "PYTHON_VERSION_MISMATCH",
                 "PermissionError", "Permission denied", "Read-only file system")
MEMORY_ERRORS = ("MemoryError", "bad_alloc", "Failed to allocate", "BFCArena")  # ONNX Runtime's arena: its own text


def _job_error(e: BaseException, out_uri: str) -> SparkIndexError:
    """A failed job's one line: what to change for a set-up error, "run again" only otherwise."""
    cause = _cause(e)
    if any(c in str(e) for c in MEMORY_ERRORS):
        return SparkIndexError(f"the Spark job failed for want of memory ({cause[:160]}): raise "
                               f"spark.executor.pyspark.memory, a cap on each Python worker's address space "
                               f"(README: Sizing)")
    if any(c in cause for c in CONFIG_ERRORS):
        return SparkIndexError(f"the Spark job failed ({cause}); {PYTHON_HINT}")
    return SparkIndexError(f"the Spark job failed ({cause}); the shards it finished are kept under {out_uri}: "
                           f"run the same command again to resume")


def run_parts(spark, parts: Sequence[Part], encoder_file: str, preprocess, out_uri: str, batch_size: int = 64,
              max_pixels: int | None = None) -> list[tuple[str, int, int, int, float, float]]:
    """Embed ``parts`` on Spark, one task per part. -> (part, indexed, skipped, unreadable (I/O-class
    skips), seconds, Python worker peak RSS in MiB) rows. Raises :class:`SparkIndexError`."""
    if not parts:
        return []
    out_uri = absolute(out_uri)
    filesystem, root = _fs(out_uri)
    filesystem.create_dir(root, recursive=True)
    sc = spark.sparkContext
    if not encoder_file.startswith(("hdfs://", "s3://", "s3a://", "gs://")):
        sc.addFile(encoder_file)  # shipped to every executor once
    rows = [(p.name, p.kind, json.dumps([list(i) for i in p.items])) for p in parts]
    df = spark.createDataFrame(sc.parallelize(rows, numSlices=len(rows)), "part string, kind string, items string")
    body = functools.partial(_embed_parts, encoder_file=encoder_file, preprocess=preprocess, out_uri=out_uri,
                             batch_size=batch_size, max_pixels=max_pixels)
    try:
        result = df.mapInArrow(body, ", ".join(f"{name} {kind}" for name, kind in STATS)).collect()
    except Exception as e:  # Py4JJavaError / PythonException: the first line names the cause
        raise _job_error(e, out_uri) from e
    return [tuple(r) for r in result]


def remove_abandoned(catalog, out_uri: str, parts: Sequence[Part]) -> int:
    """Delete shards in ``out_uri`` that neither ``parts`` (the current plan) nor the catalog
    (shards ingested before) knows: left by a run whose inputs changed before it was resumed."""
    filesystem, root = _fs(out_uri)
    ingested = {f"{SHARD_PREFIX}{key[len(PART_META):]}.parquet" for key in catalog.meta_with_prefix(PART_META)}
    gone = sorted(done_parts(out_uri) - ingested - {p.file for p in parts})
    for name in gone:
        filesystem.delete_file(f"{root}/{name}")
    return len(gone)


def _paths(table) -> list[str]:
    """The path column: file-system bytes (or text, in shards written before 0.2)."""
    return [os.fsdecode(p) if isinstance(p, bytes) else p for p in table["path"].to_pylist()]


def _shard_rows(batch, dim: int, file_name: str, first_row: int) -> tuple[list[IndexedFile], list[SkippedFile]]:
    """One record batch of a shard as catalog rows: the indexed ones refer to their vector in the
    shard (``file_name``, row among its indexed rows, counting from ``first_row``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.Table.from_batches([batch])
    ok = pc.equal(table["status"], "indexed")
    good, bad = table.filter(ok), table.filter(pc.invert(ok))
    if good.num_rows and getattr(table.schema.field("embedding").type, "list_size", -1) != dim:
        raise SparkIndexError(f"{file_name}: vectors of dimension {dim} expected")
    indexed = [IndexedFile(p, s, m, None, file_name, first_row + r) for r, (p, s, m) in enumerate(
        zip(_paths(good), good["size"].to_pylist(), good["mtime_ns"].to_pylist()))]
    skipped = [SkippedFile(p, s, m, r or "skipped") for p, s, m, r in zip(
        _paths(bad), bad["size"].to_pylist(), bad["mtime_ns"].to_pylist(), bad["reason"].to_pylist())]
    return indexed, skipped


def ingest(catalog, part: Part, out_uri: str, dim: int) -> tuple[int, int]:
    """Record one shard in the catalog in one transaction: its files, with references to their
    vectors in the shard (the catalog stores no copy: :mod:`.shards`). -> (indexed, skipped)."""
    n_ok = n_bad = 0
    with catalog.transaction():
        if part.kind == "tar":
            shard, size, mtime = part.items[0]
            catalog.remove_prefix(f"{shard}::")  # members gone from a rewritten shard
        for batch in read_batches(out_uri, part.file, columns=[*SHARD_COLUMNS]):
            indexed, skipped = _shard_rows(batch, dim, part.file, n_ok)
            catalog.write_batch(indexed, skipped)
            n_ok += len(indexed)
            n_bad += len(skipped)
        if part.kind == "tar":
            catalog.set_meta(TAR_META + shard, f"{size}:{mtime}")
        catalog.set_meta(PART_META + part.name, str(n_ok + n_bad))
    return n_ok, n_bad


SHARD_COLUMNS = ("path", "size", "mtime_ns", "status", "reason", "embedding")


# ----------------------------------------------------------------------------- where the vectors are
def _shard_problems(uri: str, refs: dict[str, tuple[int, int]]) -> dict[str, str]:
    """The referenced shards that are missing under ``uri``, unreadable, or hold fewer indexed rows
    than the catalog refers to (rewritten): name -> why."""
    from .shards import ShardError, indexed_count

    present = done_parts(uri)
    bad = {}
    for name, (_, top) in refs.items():
        if name not in present:
            bad[name] = "missing"
            continue
        try:
            n = indexed_count(uri, name)
        except ShardError as e:
            bad[name] = str(e).split(" (", 1)[-1].rstrip(")") or "unreadable"
            continue
        if n <= top:
            bad[name] = f"holds {n} vectors, row {top} referred to (rewritten)"
    return bad


def prepare_shards(catalog, requested: str | None, default: str) -> str:
    """Where this run keeps its shards, checked before anything is planned: ``requested``
    (``--embeddings``), else where the catalog recorded them, else ``default``. Shards the catalog
    refers to that are missing, unreadable or rewritten there have their files embedded again (the
    rows are forgotten, so the plan finds them new), with a warning. Raises
    :class:`SparkIndexError` when none of them is there and the folder is gone (moved: pass it as
    ``--embeddings``), or when a requested new place lacks some of them."""
    recorded = catalog.shards_uri
    uri = absolute(requested or recorded or default)
    refs = catalog.shard_refs()
    if refs:
        filesystem, root = _fs(uri)
        from pyarrow import fs

        gone = filesystem.get_file_info(root).type == fs.FileType.NotFound
        bad = dict.fromkeys(refs, "missing") if gone else _shard_problems(uri, refs)
        if recorded and uri != recorded and bad:
            raise SparkIndexError(f"this index's vectors live in the Parquet shards under {recorded}, and {uri} lacks "
                                  f"or cannot read {len(bad)} of them; pass --embeddings {recorded} (or move the "
                                  f"shards there)")
        if gone:
            raise SparkIndexError(f"the {len(refs)} Parquet shards holding this index's vectors are not under {uri} "
                                  f"(no such folder): if you moved them, pass --embeddings NEWPLACE; to embed their "
                                  f"{sum(c for c, _ in refs.values())} images again, create the empty folder {uri}")
        if recorded and uri != recorded:
            log.info("the shards holding this index's vectors moved from %s to %s", recorded, uri)
        if bad:
            name, why = next(iter(bad.items()))
            n = catalog.forget_shards(list(bad))
            catalog.delete_meta([PART_META + b[len(SHARD_PREFIX):-len(".parquet")] for b in bad])
            for b, problem in bad.items():
                if problem != "missing":
                    filesystem.delete_file(f"{root}/{b}")
            log.warning("%d of the %d shards holding this index's vectors under %s are missing or damaged (%s: %s); "
                        "their %d images are embedded again", len(bad), len(refs), uri, name, why, n)
    catalog.set_shards_uri(uri)
    return uri


# ----------------------------------------------------------------------------- the runner
MOSTLY_UNREADABLE = 0.5  # a run whose executors could not read more of its images than this stops


def _check_visibility(stats: Sequence[tuple], pending: Sequence[Part], out_uri: str) -> None:
    """Stop a run whose executors could not read most of its files while this machine reads them
    (a folder only the driver sees); the shards holding such skips are deleted, so that the next
    run embeds them again. Files unreadable here too stay skips, retried by the next run."""
    unreadable, rows = sum(r[3] for r in stats), sum(r[1] + r[2] for r in stats)
    if not rows or unreadable <= MOSTLY_UNREADABLE * rows:
        return
    by_name = {p.name: p for p in pending}
    failing = [by_name[r[0]] for r in stats if r[3]]
    spread = _spread(failing)
    readable_here = [p for p in spread if _unreadable(p) is None]
    if len(readable_here) <= len(spread) / 2:
        return
    filesystem, root = _fs(out_uri)
    for part in failing:
        filesystem.delete_file(f"{root}/{part.file}")
    raise SparkIndexError(f"the executors could not read {unreadable} of the {rows} images they were given, which "
                          f"this machine reads (e.g. {readable_here[0]}); {VISIBILITY_HINT}; nothing of them was "
                          f"added to the index")


def _embed_pending(job, pending: Sequence[Part], out_uri: str, batch_size: int, max_pixels: int | None,
                   master: str | None, spark, report) -> str:
    """Probe the executors, then run the parts not yet written on Spark; -> the master they ran on."""
    from ..encode.backends import verified_onnx
    from ..encode.cache import default_cache_dir
    from ..encode.modules import NormalizedImageEncoder

    model = job.model
    verified = verified_onnx(NormalizedImageEncoder(model), f"encoder-{job.model_hash}",
                             model.image_tower.image_size, default_cache_dir())
    if verified is None:
        raise SparkIndexError("the Spark engine ships the image encoder as ONNX, and this model's did not "
                              "export; index with --engine torch instead")
    session = spark or spark_session(master)
    log.info("embedding %d shards on Spark (%s; executors' Python: %s)", len(pending), session.sparkContext.master,
             session.sparkContext.pythonExec)
    probe_executors(session, out_uri, _probe_samples(pending))
    t1 = time.perf_counter()
    stats = run_parts(session, pending, str(verified[0]), model.image_tower.preprocessor(), out_uri, batch_size,
                      max_pixels)
    report.embed_seconds = time.perf_counter() - t1
    _check_visibility(stats, pending, out_uri)
    report.embedded = sum(r[1] for r in stats)
    report.worker_peak_mb = max(r[5] for r in stats)
    log.info("Spark: %d shards in %.1f s; a shard took %.1f-%.1f s; Python workers peaked at %.0f MiB",
             len(stats), report.embed_seconds, min(r[4] for r in stats), max(r[4] for r in stats),
             report.worker_peak_mb)
    return session.sparkContext.master


def run_plan(job, plan: Plan, report, out_uri: str, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 64,
             max_pixels: int | None = None, master: str | None = None, spark=None) -> None:
    """The Spark runner: cut the plan into parts, embed those without a shard under ``out_uri`` on
    Spark, ingest every part's shard into ``job.catalog`` in plan order (a run killed while
    ingesting re-cuts the same parts), and delete shards no plan or catalog knows. A part ingested
    before and planned again (its files were skipped as unreadable) is embedded again.
    ``out_uri``: a local path (made absolute here) or a URI. Raises :class:`SparkIndexError`."""
    out_uri = absolute(out_uri)
    parts = make_parts(plan.todo, plan.tars, shard_size, job.model_hash)
    done = done_parts(out_uri)
    ingested = job.catalog.meta_with_prefix(PART_META)
    pending = [p for p in parts if p.file not in done or PART_META + p.name in ingested]
    shards = f"{len(pending)} shards embedded, {len(parts) - len(pending)} reused"
    report.engine = f"spark, {shards}"
    if pending:
        used = _embed_pending(job, pending, out_uri, batch_size, max_pixels, master, spark, report)
        report.engine = f"spark {used}, {shards}"
    dim = job.model.config.embed_dim
    for part in parts:
        report.added += ingest(job.catalog, part, out_uri, dim)[0]
    remove_abandoned(job.catalog, out_uri, parts)
