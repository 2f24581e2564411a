"""Embeddings in and out of an index, in clip-retrieval's layout.

``OUT/img_emb/img_emb_0.npy`` (float32 ``[N, D]``) + ``OUT/metadata/metadata_0.parquet``
(``image_path``), as clip-retrieval writes them; or one Parquet file with a path column and a
vector column (``fixed_size_list<float32>`` or a list column).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..storage import atomic_path, write_text
from .catalog import Catalog
from .manifest import IndexError_, read_manifest


class EmbeddingsError(IndexError_):
    """Embeddings files that cannot be read as vectors with paths."""


def check_vectors(vectors: np.ndarray, source: str | os.PathLike | None = None) -> None:
    """Refuse vectors an index cannot search: ``vectors`` must be ``[N, D]`` (D >= 1) with every
    value finite and no all-zero row (a zero vector has no direction: cosine scores are undefined).

    Raises :class:`EmbeddingsError` naming the first bad row (0-based) and how many rows are bad;
    ``source`` (a path) prefixes the message."""
    where = f"{source}: " if source is not None else ""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or (len(vectors) and vectors.shape[1] == 0):
        raise EmbeddingsError(f"{where}expected vectors of shape [N, D], got shape {list(vectors.shape)}")
    if not np.issubdtype(vectors.dtype, np.number):
        raise EmbeddingsError(f"{where}expected numeric vectors, got dtype {vectors.dtype}")
    finite = np.isfinite(vectors).all(axis=1)
    zero = finite & ~np.any(vectors != 0, axis=1)
    bad = ~finite | zero
    n_bad = int(bad.sum())
    if n_bad:
        first = int(np.argmax(bad))
        what = "non-finite values (NaN or inf)" if not finite[first] else "all zeros"
        raise EmbeddingsError(f"{where}{n_bad} of {len(vectors)} vectors are unusable ({int((~finite).sum())} "
                              f"with NaN/inf, {int(zero.sum())} all zeros); the first is row {first} "
                              f"(0-based, {what})")


def _read_parquet(source: Path, path_column: str, vector_column: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not Parquet
        raise EmbeddingsError(f"{source}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
    for col in (path_column, vector_column):
        if col not in table.column_names:
            raise EmbeddingsError(f"{source}: no column {col!r} (columns: {', '.join(table.column_names)})")
    paths = [str(p) for p in table.column(path_column).to_pylist()]
    if not len(table):
        raise EmbeddingsError(f"{source}: no rows")
    try:
        vectors = np.asarray(table.column(vector_column).to_pylist(), dtype=np.float32)
    except (ValueError, TypeError) as e:  # ragged lists, missing (null) vectors, text
        raise EmbeddingsError(f"{source}: column {vector_column!r} does not hold vectors of one length") from e
    return paths, vectors


def read_embeddings(source: str | os.PathLike, path_column: str = "image_path",
                    vector_column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """-> (paths, vectors ``[N, D]`` float32) from clip-retrieval's layout (a folder with
    ``img_emb/*.npy`` + ``metadata/*.parquet``, matched by sorted order) or one Parquet file.
    Raises :class:`EmbeddingsError` for anything else, and for vectors :func:`check_vectors` refuses
    (NaN/inf values, all-zero rows: the message names the first bad row and how many are bad)."""
    source = Path(source)
    paths, vectors = _read_parquet(source, path_column, vector_column) if source.is_file() else _read_folder(
        source, path_column)
    check_vectors(vectors, source)
    return paths, vectors


def _read_folder(source: Path, path_column: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    npys = sorted((source / "img_emb").glob("*.npy"))
    metas = sorted((source / "metadata").glob("*.parquet"))
    if not npys or len(npys) != len(metas):
        raise EmbeddingsError(f"{source}: expected img_emb/*.npy and as many metadata/*.parquet files "
                              f"(found {len(npys)} and {len(metas)})")
    paths, parts = [], []
    for npy, meta in zip(npys, metas):
        try:
            vec = np.load(npy, allow_pickle=False)
            table = pq.read_table(meta, columns=[path_column])
        except Exception as e:  # numpy's ValueError/OSError, pyarrow's errors
            raise EmbeddingsError(f"{npy.parent.parent}: cannot read {npy.name} / {meta.name} "
                                  f"({str(e).splitlines()[0]})") from e
        if vec.ndim != 2 or not np.issubdtype(vec.dtype, np.number):
            raise EmbeddingsError(f"{npy}: expected a numeric [N, D] array, got {vec.dtype} of shape "
                                  f"{list(vec.shape)}")
        if parts and vec.shape[1] != parts[0].shape[1]:
            raise EmbeddingsError(f"{npy}: {vec.shape[1]}-d vectors, but {npys[0].name} holds "
                                  f"{parts[0].shape[1]}-d ones")
        if len(table) != len(vec):
            raise EmbeddingsError(f"{meta}: {len(table)} rows for {len(vec)} vectors in {npy}")
        paths += [str(p) for p in table.column(path_column).to_pylist()]
        parts.append(vec.astype(np.float32))
    vectors = np.concatenate(parts)
    if not len(vectors):
        raise EmbeddingsError(f"{source}: no vectors")
    return paths, vectors


def write_embeddings(index_dir: str | os.PathLike, out: str | os.PathLike) -> int:
    """An index's vectors and paths in clip-retrieval's layout under ``out``, plus ``model.json``
    (the model the vectors came from). -> number of vectors written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(index_dir)
    if manifest is None:
        raise IndexError_(f"{index_dir}: not a dualsearch index (no manifest.json)")
    cat = Catalog(index_dir, readonly=True)
    try:
        ids, vecs = cat.vectors(int(manifest["dim"]))
        paths = cat.paths_for(ids)
    finally:
        cat.close()
    out = Path(out)
    with atomic_path(out / "img_emb" / "img_emb_0.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vecs.astype(np.float32))
    with atomic_path(out / "metadata" / "metadata_0.parquet") as tmp:
        pq.write_table(pa.table({"image_path": [paths[int(i)] for i in ids]}), tmp)
    write_text(out / "model.json", json.dumps(manifest["model"], indent=2))
    return len(ids)
