"""The catalog: an SQLite file inside an index folder, the source of truth for what is indexed.

One row per file: path, size, mtime, status (``indexed`` or ``skipped``), the skip reason, the
vector id and the vector itself. Work is committed in batches inside transactions, so a run
killed at any point leaves a consistent catalog and the next run resumes where it stopped.
The FAISS index is derived from it (``generation`` tells when it is stale).
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.sqlite"


class CatalogError(ValueError):
    pass


class Catalog:
    def __init__(self, folder: str | os.PathLike, create: bool = False):
        self.path = Path(folder) / CATALOG_FILE
        if not create and not self.path.is_file():
            raise CatalogError(f"{folder}: not a dualsearch index (no {CATALOG_FILE})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # one connection shared by a server's threads: callers serialise access (Searcher's lock)
            self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"{self.path}: damaged catalog ({e})") from e

    def _init_schema(self) -> None:
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("""CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('indexed', 'skipped')), reason TEXT,
                vector_id INTEGER UNIQUE, vector BLOB)""")
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
                self.set_meta("generation", "0")
            elif int(version) != SCHEMA_VERSION:
                raise CatalogError(f"{self.path}: catalog schema {version} is not supported "
                                   f"(this dualsearch reads {SCHEMA_VERSION}); re-index into a new folder")

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def _bump(self) -> None:
        self.set_meta("generation", str(self.generation + 1))

    # ------------------------------------------------------------------ files
    def stats(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every known file."""
        return {p: (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM files")}

    def next_vector_id(self) -> int:
        row = self.db.execute("SELECT MAX(vector_id) FROM files").fetchone()
        nxt = int(self.get_meta("next_vector_id") or 0)
        return max(nxt, (row[0] + 1) if row[0] is not None else 0)

    def write_batch(self, indexed: Sequence[tuple[str, int, int, np.ndarray]],
                    skipped: Sequence[tuple[str, int, int, str]]) -> None:
        """Insert or replace rows in one transaction: (path, size, mtime_ns, vector) and
        (path, size, mtime_ns, reason)."""
        with self.db:
            self.insert(indexed, skipped)

    def insert(self, indexed: Sequence[tuple[str, int, int, np.ndarray]],
               skipped: Sequence[tuple[str, int, int, str]]) -> None:
        """:meth:`write_batch` inside the caller's transaction (``with catalog.db:``)."""
        vid = self.next_vector_id()
        rows = []
        for path, size, mtime, vec in indexed:
            rows.append((path, size, mtime, "indexed", None, vid, np.asarray(vec, np.float32).tobytes()))
            vid += 1
        rows += [(path, size, mtime, "skipped", reason, None, None) for path, size, mtime, reason in skipped]
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.set_meta("next_vector_id", str(vid))  # ids are never reused
        self._bump()

    def remove_prefix(self, prefix: str) -> int:
        """Delete every row whose path starts with ``prefix``, inside the caller's transaction."""
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        cur = self.db.execute("DELETE FROM files WHERE path >= ? AND path < ?", (prefix, upper))
        if cur.rowcount:
            self._bump()
        return cur.rowcount

    def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return dict(self.db.execute("SELECT key, value FROM meta WHERE key >= ? AND key < ?", (prefix, upper)))

    def remove(self, paths: Iterable[str]) -> int:
        paths = list(paths)
        with self.db:
            self.db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])
            if paths:
                self._bump()
        return len(paths)

    def count(self, status: str = "indexed") -> int:
        return self.db.execute("SELECT COUNT(*) FROM files WHERE status = ?", (status,)).fetchone()[0]

    def skipped(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, reason FROM files WHERE status = 'skipped' ORDER BY path"))

    def iter_vectors(self, dim: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [b], vectors [b, dim]) in batches, ordered by vector id."""
        cur = self.db.execute("SELECT vector_id, vector FROM files WHERE status = 'indexed' ORDER BY vector_id")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, vecs

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors(dim))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def paths_for(self, ids: Sequence[int]) -> dict[int, str]:
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return {}
        q = f"SELECT vector_id, path FROM files WHERE vector_id IN ({','.join('?' * len(ids))})"
        return dict(self.db.execute(q, ids))

    def vector_for(self, vector_id: int, dim: int) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM files WHERE vector_id = ?", (int(vector_id),)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).reshape(dim) if row else None

    def id_for_path(self, path: str) -> int | None:
        row = self.db.execute("SELECT vector_id FROM files WHERE path = ? AND status = 'indexed'", (path,)).fetchone()
        return row[0] if row else None

    def path_for(self, vector_id: int) -> str | None:
        row = self.db.execute("SELECT path FROM files WHERE vector_id = ? AND status = 'indexed'",
                              (int(vector_id),)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()
