"""The catalog: an SQLite file inside an index folder, the source of truth for what is indexed.

One row per file: path, size, mtime, status (``indexed`` or ``skipped``), the skip reason, the
vector id and the vector itself. Work is committed in transactions (``with
catalog.transaction():``), so a run killed at any point leaves a consistent catalog and the next
run resumes where it stopped. The FAISS index is derived from it (``generation`` tells when it is
stale). Every statement lives in this module; callers use the named methods.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..data.records import display_name
from ..errors import DualsearchError

SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.sqlite"


class CatalogError(DualsearchError):
    """A catalog that cannot be opened or used (missing, damaged, another schema or model)."""


class FileStat(NamedTuple):
    """What tells a changed file: size in bytes and mtime in nanoseconds."""

    size: int
    mtime_ns: int


class IndexedFile(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    vector: np.ndarray  # [D] float32, unit length


class SkippedFile(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    reason: str


class Skip(NamedTuple):
    path: str
    reason: str


def to_db(text: str) -> str | bytes:
    """A path (or meta value) as stored: text when it is valid UTF-8, else its file-system bytes.
    A Linux name such as ``b"caf\\xe9.jpg"`` arrives from ``os`` as ``"caf\\udce9.jpg"``
    (surrogateescape), which SQLite cannot hold as text; as bytes it round-trips losslessly."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def from_db(value: str | bytes | None) -> str | None:
    """The inverse of :func:`to_db`."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _explain(e: sqlite3.DatabaseError, path: Path) -> str:
    """What an SQLite error on opening means for the user: a full or read-only volume is not a
    damaged catalog."""
    try:
        vfs = os.statvfs(path.parent)
        full, readonly = vfs.f_bavail == 0, bool(vfs.f_flag & os.ST_RDONLY)
    except OSError:
        full = readonly = False
    if full or "full" in str(e):
        return f"no space left on the device while opening {path} for writing (the catalog is unchanged)"
    if readonly or "readonly" in str(e).replace(" ", ""):
        return f"{path}: the index is on a read-only volume (search it, or index into a writable folder)"
    return f"{path}: damaged catalog ({e})"


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """[low, high) of the strings that start with ``prefix`` (an index range scan, unlike LIKE)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Catalog:
    """``Catalog(folder)`` opens ``folder/catalog.sqlite``; ``create=True`` makes it when missing,
    ``readonly=True`` opens it without write access. Raises :class:`CatalogError`."""

    def __init__(self, folder: str | os.PathLike, create: bool = False, readonly: bool = False):
        self.path = Path(folder) / CATALOG_FILE
        self.readonly = readonly
        if not (create and not readonly) and not self.path.is_file():
            raise CatalogError(f"{folder}: not a dualsearch index (no {CATALOG_FILE})")
        self._depth = 0
        try:
            if readonly:
                self.db = self._connect_readonly()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # one connection shared by a server's threads: callers serialise access (Searcher's lock)
                self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            raise CatalogError(_explain(e, self.path)) from e

    def _connect_readonly(self) -> sqlite3.Connection:
        """Read-only, so an index on a read-only volume searches; where SQLite cannot make the
        WAL's shared-memory file there, the volume cannot change either: open it immutable."""
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, check_same_thread=False)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
            return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=60, check_same_thread=False)

    def _init_schema(self) -> None:
        if not self.readonly:
            with self.transaction():
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self.db.execute("""CREATE TABLE IF NOT EXISTS files (
                    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                    status TEXT NOT NULL CHECK (status IN ('indexed', 'skipped')), reason TEXT,
                    vector_id INTEGER UNIQUE, vector BLOB)""")
                if self.get_meta("schema_version") is None:
                    self.set_meta("schema_version", str(SCHEMA_VERSION))
                    self.set_meta("generation", "0")
        version = self.get_meta("schema_version")
        if version is None or int(version) != SCHEMA_VERSION:
            raise CatalogError(f"{self.path}: catalog schema {version} is not supported "
                               f"(this dualsearch reads {SCHEMA_VERSION}); re-index into a new folder")

    @contextmanager
    def transaction(self) -> Iterator["Catalog"]:
        """Everything inside commits together, or not at all (nested blocks join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self.db:
                yield self
        except sqlite3.OperationalError as e:
            if "full" in str(e):
                raise CatalogError(f"no space left on the device while writing {self.path} (the catalog keeps "
                                   f"everything committed before; free some space and run again)") from e
            if "readonly" in str(e).replace("-", "").replace(" ", ""):
                raise CatalogError(f"{self.path}: cannot write the catalog here (read-only)") from e
            raise
        finally:
            self._depth = 0

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return from_db(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (to_db(key), to_db(value)))

    def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` -> its value."""
        return {from_db(k): from_db(v) for k, v in self.db.execute(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?", _prefix_bounds(prefix))}

    def delete_meta(self, keys: Iterable[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM meta WHERE key = ?", [(to_db(k),) for k in keys])

    @property
    def generation(self) -> int:
        """Bumped by every change to the files table (the ANN index records the one it was built from)."""
        return int(self.get_meta("generation") or 0)

    def _bump(self) -> None:
        self.set_meta("generation", str(self.generation + 1))

    def bind_model(self, model_hash: str, model_path: str) -> None:
        """Record the model the vectors come from; raises :class:`CatalogError` when the catalog
        already holds another model's vectors."""
        recorded = self.get_meta("model_hash")
        if recorded and recorded != model_hash:
            raise CatalogError(f"{self.path.parent}: built with another model ({self.get_meta('model_path')}, "
                               f"hash {recorded}); index into a new folder, or pass that model")
        if not recorded or self.get_meta("model_path") != model_path:  # new, or the same model moved
            with self.transaction():
                self.set_meta("model_hash", model_hash)
                self.set_meta("model_path", model_path)

    # ------------------------------------------------------------------ files
    def file_stats(self) -> dict[str, FileStat]:
        """path -> (size, mtime_ns) of every known file, indexed or skipped."""
        return {from_db(p): FileStat(s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM files")}

    def _next_vector_id(self) -> int:
        row = self.db.execute("SELECT MAX(vector_id) FROM files").fetchone()
        nxt = int(self.get_meta("next_vector_id") or 0)
        return max(nxt, (row[0] + 1) if row[0] is not None else 0)

    def write_batch(self, indexed: Sequence[IndexedFile], skipped: Sequence[SkippedFile]) -> None:
        """Insert or replace rows in one transaction (or the caller's); indexed rows get new vector
        ids, which are never reused."""
        with self.transaction():
            vid = self._next_vector_id()
            rows = []
            for f in map(IndexedFile._make, indexed):
                rows.append((to_db(f.path), f.size, f.mtime_ns, "indexed", None, vid,
                             np.asarray(f.vector, np.float32).tobytes()))
                vid += 1
            rows += [(to_db(f.path), f.size, f.mtime_ns, "skipped", display_name(f.reason), None, None)
                     for f in map(SkippedFile._make, skipped)]
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.set_meta("next_vector_id", str(vid))
            self._bump()

    def remove(self, paths: Iterable[str]) -> int:
        """Delete these rows. -> how many were asked for."""
        paths = list(paths)
        with self.transaction():
            self.db.executemany("DELETE FROM files WHERE path = ?", [(to_db(p),) for p in paths])
            if paths:
                self._bump()
        return len(paths)

    def remove_prefix(self, prefix: str) -> int:
        """Delete every row whose path starts with ``prefix``. -> rows deleted."""
        with self.transaction():
            cur = self.db.execute("DELETE FROM files WHERE path >= ? AND path < ?", _prefix_bounds(prefix))
            if cur.rowcount:
                self._bump()
        return cur.rowcount

    def count(self, status: str = "indexed") -> int:
        return self.db.execute("SELECT COUNT(*) FROM files WHERE status = ?", (status,)).fetchone()[0]

    def skipped(self) -> list[Skip]:
        """Skipped files with their reasons, by path."""
        return [Skip(from_db(p), r) for p, r in self.db.execute(
            "SELECT path, reason FROM files WHERE status = 'skipped' ORDER BY path")]

    # ------------------------------------------------------------------ vectors
    def iter_vectors(self, dim: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids ``[b]`` int64, vectors ``[b, dim]`` float32) in batches, ordered by vector id."""
        cur = self.db.execute("SELECT vector_id, vector FROM files WHERE status = 'indexed' ORDER BY vector_id")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            ids = np.fromiter((vid for vid, _ in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, vecs

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All (ids ``[N]``, vectors ``[N, dim]``) at once."""
        parts = list(self.iter_vectors(dim))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def paths_for(self, ids: Sequence[int]) -> dict[int, str]:
        """vector id -> path for the ids that exist (negative ids, FAISS's "none", are ignored)."""
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return {}
        q = f"SELECT vector_id, path FROM files WHERE vector_id IN ({','.join('?' * len(ids))})"
        return {vid: from_db(p) for vid, p in self.db.execute(q, ids)}

    def vector_for(self, vector_id: int, dim: int) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM files WHERE vector_id = ?", (int(vector_id),)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).reshape(dim) if row else None

    def id_for_path(self, path: str) -> int | None:
        row = self.db.execute("SELECT vector_id FROM files WHERE path = ? AND status = 'indexed'",
                              (to_db(path),)).fetchone()
        return row[0] if row else None

    def path_for(self, vector_id: int) -> str | None:
        row = self.db.execute("SELECT path FROM files WHERE vector_id = ? AND status = 'indexed'",
                              (int(vector_id),)).fetchone()
        return from_db(row[0]) if row else None

    def close(self) -> None:
        self.db.close()
