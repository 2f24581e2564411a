"""Parquet shards: where the Spark path keeps its vectors (local folders or any URI pyarrow opens).

A shard (``part-<name>.parquet``, written by one Spark task) holds one row per file: ``path``
(file-system bytes), ``size``, ``mtime_ns``, ``status`` (``indexed`` / ``skipped``), ``reason``
and ``embedding`` (``fixed_size_list<float32>[D]``, unit vectors; null for skipped rows). The
shards are the only copy of the Spark path's vectors: the catalog refers to a vector as (shard,
row among the shard's indexed rows) and reads it from here (:func:`read_embeddings`), so that it
stores about 150 bytes a file instead of 4D more.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ..errors import DualsearchError


class ShardError(DualsearchError):
    """A shard folder that cannot be opened, or a shard that cannot be read."""


def absolute(uri: str) -> str:
    """A local path made absolute (executors run in their own working folders); URIs
    (``s3://``, ``file://``...) unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str):
    """-> (pyarrow filesystem, path inside it) for a local path or any URI pyarrow knows
    (s3://, gs://, hdfs://, file://). Raises :class:`ShardError`."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(absolute(uri))
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError with a clear text
        raise ShardError(f"{uri}: cannot open this location ({e})") from e


def read_batches(uri: str, file_name: str, batch_rows: int = 50_000, columns: list[str] | None = None) -> Iterator:
    """Record batches of one shard (``columns``: all when None). Raises :class:`ShardError`."""
    import pyarrow.parquet as pq

    fsys, root = filesystem(uri)
    try:
        with fsys.open_input_file(f"{root}/{file_name}") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, ValueError) as e:  # missing, unreadable, not Parquet (ArrowInvalid is a ValueError)
        raise ShardError(f"{uri}/{file_name}: cannot read this shard ({str(e).splitlines()[0]})") from e


def indexed_embeddings(batch, dim: int, where: str) -> np.ndarray:
    """The ``[n, dim]`` float32 vectors of a record batch's (or table's) rows whose status is
    ``indexed``, in row order. Raises :class:`ShardError` for another dimension."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    good = table.filter(pc.equal(table["status"], "indexed"))
    if not good.num_rows:
        return np.zeros((0, dim), np.float32)
    flat = good["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != good.num_rows * dim:
        raise ShardError(f"{where}: vectors of dimension {dim} expected")
    return np.asarray(flat, np.float32).reshape(-1, dim)


def read_embeddings(uri: str, file_name: str, dim: int) -> np.ndarray:
    """Every indexed row's vector in one shard: ``[n_indexed, dim]`` float32, row ``r`` being the
    catalog's ``shard_row`` ``r``. Raises :class:`ShardError`."""
    parts = [indexed_embeddings(b, dim, f"{uri}/{file_name}")
             for b in read_batches(uri, file_name, columns=["status", "embedding"])]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def indexed_count(uri: str, file_name: str) -> int:
    """How many rows of one shard are indexed (reads its status column only). Raises
    :class:`ShardError` for a missing or unreadable shard."""
    return sum(int((b.column(0).to_numpy(zero_copy_only=False) == "indexed").sum())
               for b in read_batches(uri, file_name, columns=["status"]))
