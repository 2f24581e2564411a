"""The catalog: an SQLite file inside an index folder, the source of truth for what is indexed.

One row per file: path, size, mtime, status (``indexed`` or ``skipped``), the skip reason, the
vector id, the vector itself and the photo's metadata (:mod:`dualsearch.data.metadata`: date
taken, size, format, camera, GPS; filled in by the indexing run's metadata pass). Paths under the
indexed root (meta ``images_root``) are stored relative to it, so a moved photo folder is
re-rooted (:meth:`Catalog.set_root`) and every vector re-used; other paths and URIs are stored
whole. Schema 1 catalogs (dualsearch 0.1: absolute paths, no metadata) are upgraded in place when
opened for writing, and read as they are when opened read-only. Work is committed in transactions (``with
catalog.transaction():``), so a run killed at any point leaves a consistent catalog and the next
run resumes where it stopped. The FAISS index is derived from it (``generation`` tells when it is
stale). Every statement lives in this module; callers use the named methods.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..data.metadata import METADATA_VERSION, PhotoMetadata
from ..data.records import display_name
from ..errors import DualsearchError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)  # read-only as they are; 1 and 2 are upgraded on the first write
CATALOG_FILE = "catalog.sqlite"
# schema 2: the photo's metadata (dualsearch.data.metadata.PhotoMetadata) beside its vector
METADATA_COLUMNS = (("taken", "TEXT"), ("taken_offset", "TEXT"), ("date_source", "TEXT"), ("width", "INTEGER"),
                    ("height", "INTEGER"), ("format", "TEXT"), ("camera_make", "TEXT"), ("camera_model", "TEXT"),
                    ("lat", "REAL"), ("lon", "REAL"), ("metadata_version", "INTEGER"))


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
    vector: np.ndarray | None  # [D] float32, unit length; None: it lives in a Parquet shard
    shard: str | None = None  # that shard's file name (under the catalog's ``shards_uri``)
    shard_row: int | None = None  # its row among the shard's indexed rows


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


FORMAT_ALIASES = {"JPG": "JPEG", "JPE": "JPEG", "TIF": "TIFF", "HEIC": "HEIF", "HIF": "HEIF"}


def _iso_date(value: str | None, what: str) -> str | None:
    """``"2024-05-01"`` or a full ISO date-time, checked; raises :class:`CatalogError`."""
    from datetime import date, datetime

    if value in (None, ""):
        return None
    try:
        return (date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)).isoformat()
    except (TypeError, ValueError):
        raise CatalogError(f"{what}: not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS): {value!r}") from None


def _folder_bounds(folder: str) -> list[tuple]:
    """The path ranges of the rows below ``folder``: as text, and as bytes for the rows stored as
    BLOBs (names that are not valid UTF-8, :func:`to_db`; SQLite orders every TEXT before any BLOB,
    so each range matches its own kind only)."""
    raw = os.fsencode(folder) + b"/"
    out = [(raw, raw[:-1] + bytes([raw[-1] + 1]))]
    if isinstance(to_db(folder), str):
        out.append(_prefix_bounds(folder + "/"))
    return out


def _like_literal(text: str) -> str:
    """``text`` matched literally by SQL LIKE ... ESCAPE '\\' (its ``%`` and ``_`` are no wildcards)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class PhotoFilter:
    """Which indexed images a search may return; every given condition must hold (a repeated one:
    any of its values). ``folders``: folders under the indexed root (relative, or absolute under
    it); ``globs``: shell patterns matched against the path relative to the root when they hold a
    ``/``, else against the file name; ``after``: taken on or after this ISO date (date-time);
    ``before``: taken strictly before it; ``cameras``: case-insensitive substrings of "make
    model"; ``formats``: Pillow format names or extensions (``jpg``, ``heic``); ``min_width`` /
    ``min_height`` in pixels. Dates compare the camera's local time (see
    :mod:`dualsearch.data.metadata`). Raises :class:`CatalogError` for a malformed date."""

    folders: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    after: str | None = None
    before: str | None = None
    cameras: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "after", _iso_date(self.after, "after"))
        object.__setattr__(self, "before", _iso_date(self.before, "before"))

    def __bool__(self) -> bool:
        return any((self.folders, self.globs, self.after, self.before, self.cameras, self.formats,
                    self.min_width, self.min_height))

    def needs_metadata(self) -> bool:
        return any((self.after, self.before, self.cameras, self.formats, self.min_width, self.min_height))

    def sql(self, rel) -> tuple[str, list]:
        """(`` AND ...`` clauses, arguments); ``rel`` maps a path to its stored form."""
        clauses, args = [], []

        def any_of(parts: list[str], values: list) -> None:
            clauses.append("(" + " OR ".join(parts) + ")")
            args.extend(values)

        if self.folders:
            parts, values = [], []
            for f in self.folders:
                f = f.rstrip("/") or "/"
                if from_db(rel(f + "/\x00")) == "\x00":  # the indexed root itself: every row stored relative
                    parts.append("(CAST(substr(path, 1, 1) AS TEXT) != '/' AND instr(path, '://') = 0)")
                    continue
                for lo, hi in _folder_bounds(from_db(rel(f))):
                    parts.append("(path >= ? AND path < ?)")
                    values += [lo, hi]
            any_of(parts, values)
        if self.globs:
            pats = [g if "/" in g else p for g in self.globs for p in (g, "*/" + g)]
            any_of(["path GLOB ?"] * len(pats), pats)
        if self.after:
            clauses.append("taken >= ?")
            args.append(self.after)
        if self.before:
            clauses.append("taken < ?")
            args.append(self.before)
        if self.cameras:
            like = "lower(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')) LIKE ? ESCAPE '\\'"
            any_of([like] * len(self.cameras), [f"%{_like_literal(c.lower())}%" for c in self.cameras])
        if self.formats:
            names = [FORMAT_ALIASES.get(f.upper().lstrip("."), f.upper().lstrip(".")) for f in self.formats]
            any_of(["format = ?"] * len(names), names)
        for col, value in (("width", self.min_width), ("height", self.min_height)):
            if value:
                clauses.append(f"{col} >= ?")
                args.append(int(value))
        return "".join(f" AND {c}" for c in clauses), args


class Catalog:
    """``Catalog(folder)`` opens ``folder/catalog.sqlite``; ``create=True`` makes it when missing,
    ``readonly=True`` opens it without write access. Raises :class:`CatalogError`."""

    def __init__(self, folder: str | os.PathLike, create: bool = False, readonly: bool = False):
        self.path = Path(folder) / CATALOG_FILE
        self.readonly = readonly
        self._shard_cache: dict[str, np.ndarray] = {}  # the last two shards' vectors read (_shard_vectors)
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
                    self._add_metadata_columns()
                    self._add_shard_columns()
        version = self.get_meta("schema_version")
        if version is None or not version.isdigit() or int(version) not in READABLE_SCHEMAS:
            raise CatalogError(f"{self.path}: catalog schema {version} is not supported "
                               f"(this dualsearch reads {', '.join(map(str, READABLE_SCHEMAS))}); "
                               f"re-index into a new folder")
        if int(version) < SCHEMA_VERSION and not self.readonly:
            self._upgrade(int(version))
            version = str(SCHEMA_VERSION)
        self.schema = int(version)
        self.root = self.get_meta("images_root") or "" if self.schema >= 2 else ""

    def _add_metadata_columns(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
        for name, kind in METADATA_COLUMNS:
            if name not in have:
                self.db.execute(f"ALTER TABLE files ADD COLUMN {name} {kind}")
        self.db.execute("CREATE INDEX IF NOT EXISTS files_taken ON files (taken)")

    def _add_shard_columns(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
        for name, kind in (("shard", "TEXT"), ("shard_row", "INTEGER")):
            if name not in have:
                self.db.execute(f"ALTER TABLE files ADD COLUMN {name} {kind}")

    def _upgrade(self, version: int) -> None:
        """Schema 1 -> 2 -> 3 in place, in one transaction: the metadata columns (filled in by the
        next indexing run's metadata pass, no re-embedding), paths under the root made relative
        (2); references to vectors kept in Parquet shards (3: empty for rows that store theirs)."""
        with self.transaction():
            if version < 2:
                self._add_metadata_columns()
                self.root = self.get_meta("images_root") or ""
                self._relativize(self.root)
            self._add_shard_columns()
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        log.info("%s: catalog upgraded from schema %d to %d", self.path, version, SCHEMA_VERSION)

    def _relativize(self, root: str) -> int:
        """Rows stored with an absolute path under ``root`` -> stored relative to it."""
        if not root:
            return 0
        rows = [(from_db(p),) for (p,) in self.db.execute("SELECT path FROM files WHERE path LIKE '/%' "
                                                          "OR typeof(path) = 'blob'")]
        prefix = root.rstrip("/") + "/"
        moves = [(to_db(p[len(prefix):]), to_db(p)) for (p,) in rows if p.startswith(prefix)]
        self.db.executemany("UPDATE OR REPLACE files SET path = ? WHERE path = ?", moves)
        return len(moves)

    # ------------------------------------------------------------------ paths
    def _rel(self, path: str) -> str | bytes:
        """A path as stored: relative to the root when under it (schema 2), else whole."""
        root = self.root
        if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
            path = path[len(root) + 1:]
        return to_db(path)

    def _abs(self, stored: str | bytes) -> str:
        """The inverse of :meth:`_rel`: absolute paths and URIs as stored, the rest under the root."""
        path = from_db(stored)
        if self.root and not path.startswith("/") and "://" not in path:
            return f"{self.root}/{path}"
        return path

    def set_root(self, root: str, move: bool = True) -> None:
        """Make ``root`` (an absolute folder, or "" for none) the folder relative paths live in.

        ``move=True`` (a folder indexed, or relocated): relative rows move with the root, so a
        photo folder moved from OLD to NEW and indexed again from NEW finds its rows unchanged
        (same size and mtime) and re-uses every vector. ``move=False`` (a root derived from other
        inputs): every row keeps its absolute path. Either way, absolute rows under the new root
        become relative."""
        root = root.rstrip("/") if root not in ("", "/") else root
        if root == self.root and root == (self.get_meta("images_root") or ""):
            return
        with self.transaction():
            if not move and self.root and self.root != root:
                self._absolutize(self.root)
            self.set_meta("images_root", root)
            self.root = root
            self._relativize(root)  # vectors unchanged: the ANN index stays valid (no generation bump)

    def _absolutize(self, root: str) -> None:
        """Rows stored relative -> absolute under ``root``."""
        rows = [(from_db(p),) for (p,) in self.db.execute("SELECT path FROM files WHERE (path NOT LIKE '/%' AND "
                                                          "instr(path, '://') = 0) OR typeof(path) = 'blob'")]
        moves = [(to_db(f"{root}/{p}"), to_db(p)) for (p,) in rows if not p.startswith("/") and "://" not in p]
        self.db.executemany("UPDATE OR REPLACE files SET path = ? WHERE path = ?", moves)

    def relocate(self, old: str, new: str) -> int:
        """Files moved from folder ``old`` to ``new``: the root and every absolute row under
        ``old`` follow (no file is read). -> rows whose path changed."""
        old, new = old.rstrip("/") or "/", new.rstrip("/") or "/"
        with self.transaction():
            rows = [from_db(p) for (p,) in self.db.execute("SELECT path FROM files WHERE path LIKE '/%' OR "
                                                             "typeof(path) = 'blob'")]
            moves = [(to_db(new + p[len(old):]), to_db(p)) for p in rows if p.startswith(old + "/")]
            self.db.executemany("UPDATE OR REPLACE files SET path = ? WHERE path = ?", moves)
            n = len(moves)
            if self.root == old or self.root.startswith(old + "/"):
                self.set_meta("images_root", new + self.root[len(old):])
                self.root = new + self.root[len(old):]
                n += self.db.execute("SELECT COUNT(*) FROM files WHERE typeof(path) = 'text' AND path NOT LIKE '/%' "
                                     "AND instr(path, '://') = 0").fetchone()[0]
        return n

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
        return {self._abs(p): FileStat(s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM files")}

    def _next_vector_id(self) -> int:
        row = self.db.execute("SELECT MAX(vector_id) FROM files").fetchone()
        nxt = int(self.get_meta("next_vector_id") or 0)
        return max(nxt, (row[0] + 1) if row[0] is not None else 0)

    def write_batch(self, indexed: Sequence[IndexedFile], skipped: Sequence[SkippedFile]) -> None:
        """Insert or replace rows in one transaction (or the caller's); indexed rows get new vector
        ids, which are never reused. An indexed row stores its vector, or (``vector`` None) its
        shard and row there (:meth:`set_shards_uri` says where the shards are)."""
        with self.transaction():
            vid = self._next_vector_id()
            rows = []
            for f in indexed:
                f = IndexedFile(*f)
                blob = None if f.vector is None else np.asarray(f.vector, np.float32).tobytes()
                rows.append((self._rel(f.path), f.size, f.mtime_ns, "indexed", None, vid, blob, f.shard, f.shard_row))
                vid += 1
            rows += [(self._rel(f.path), f.size, f.mtime_ns, "skipped", display_name(f.reason), None, None, None, None)
                     for f in map(SkippedFile._make, skipped)]
            self.db.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, status, reason, vector_id, "
                                "vector, shard, shard_row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.set_meta("next_vector_id", str(vid))
            self._bump()

    def remove(self, paths: Iterable[str]) -> int:
        """Delete these rows. -> how many were asked for."""
        paths = list(paths)
        with self.transaction():
            self.db.executemany("DELETE FROM files WHERE path = ?", [(self._rel(p),) for p in paths])
            if paths:
                self._bump()
        return len(paths)

    def remove_prefix(self, prefix: str) -> int:
        """Delete every row whose path starts with ``prefix``. -> rows deleted."""
        with self.transaction():
            rel = from_db(self._rel(prefix))
            cur = self.db.execute("DELETE FROM files WHERE path >= ? AND path < ?", _prefix_bounds(rel))
            if cur.rowcount:
                self._bump()
        return cur.rowcount

    def count(self, status: str = "indexed") -> int:
        return self.db.execute("SELECT COUNT(*) FROM files WHERE status = ?", (status,)).fetchone()[0]

    def skipped(self) -> list[Skip]:
        """Skipped files with their reasons, by path."""
        return [Skip(self._abs(p), r) for p, r in self.db.execute(
            "SELECT path, reason FROM files WHERE status = 'skipped' ORDER BY path")]

    # ------------------------------------------------------------------ vectors
    @property
    def shards_uri(self) -> str | None:
        """Where the Parquet shards holding this catalog's shard-referenced vectors live: a URI, or
        an absolute path (stored relative to the index folder when inside it, so a copied or moved
        index reads its own shards)."""
        uri = self.get_meta("shards_uri")
        if uri and "://" not in uri and not os.path.isabs(uri):
            return os.path.normpath(os.path.join(self.path.parent.resolve(), uri))
        return uri

    def set_shards_uri(self, uri: str) -> None:
        """Record where the shards are (see :attr:`shards_uri`); :func:`.spark.prepare_shards`
        checks that they are there first."""
        from .shards import absolute

        uri, folder = absolute(uri), str(self.path.parent.resolve())
        stored = os.path.relpath(uri, folder) if "://" not in uri and uri.startswith(folder + os.sep) else uri
        if stored != self.get_meta("shards_uri"):
            self.set_meta("shards_uri", stored)
            self._shard_cache.clear()

    def shard_refs(self) -> dict[str, tuple[int, int]]:
        """shard file name -> (indexed rows referring to it, their largest row)."""
        if self.schema < 3:
            return {}
        return {from_db(s): (c, m) for s, c, m in self.db.execute(
            "SELECT shard, COUNT(*), MAX(shard_row) FROM files WHERE shard IS NOT NULL GROUP BY shard")}

    def forget_shards(self, names: Sequence[str]) -> int:
        """Delete the rows whose vectors are in the shards ``names`` (lost or damaged: their files
        are then planned again as new). -> rows deleted."""
        with self.transaction():
            n = sum(self.db.execute("DELETE FROM files WHERE shard = ?", (to_db(name),)).rowcount for name in names)
            if n:
                self._bump()
        self._shard_cache.clear()
        return n

    def _shard_vectors(self, shard: str, dim: int) -> np.ndarray:
        """The indexed vectors ``[n, dim]`` of one shard, the last two read kept in memory."""
        from .shards import read_embeddings

        cache = self._shard_cache
        if shard not in cache:
            uri = self.shards_uri
            if uri is None:
                raise CatalogError(f"{self.path}: rows refer to shard {shard} but no shard folder is recorded")
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[shard] = read_embeddings(uri, shard, dim)
        return cache[shard]

    def _vectors_of(self, rows: Sequence[tuple], dim: int) -> np.ndarray:
        """``[len(rows), dim]`` float32 from (vector blob, shard, shard row) rows: the blob, else
        the vector read from the shard; a zero row for neither."""
        if all(r[0] is not None for r in rows):  # vectors stored in the catalog: one copy
            return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        out = np.zeros((len(rows), dim), np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, (blob, shard, row) in enumerate(rows):
            if blob is not None:
                out[i] = np.frombuffer(blob, np.float32)
            elif shard is not None:
                by_shard.setdefault(from_db(shard), []).append((i, row))
        for shard, items in by_shard.items():
            at, pos = np.array(items, np.int64).T
            vecs = self._shard_vectors(shard, dim)
            if pos.max() >= len(vecs):
                raise CatalogError(f"{self.path}: shard {shard} holds {len(vecs)} vectors, row {pos.max()} wanted "
                                   f"(the shard was rewritten; index again)")
            out[at] = vecs[pos]
        return out

    @property
    def _ref_cols(self) -> str:
        return "vector, shard, shard_row" if self.schema >= 3 else "vector, NULL, NULL"

    def iter_vectors(self, dim: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids ``[b]`` int64, vectors ``[b, dim]`` float32) in batches, ordered by vector id; vectors
        kept in shards are read from them (a shard at a time: the Spark path numbers a shard's rows
        consecutively). Raises :class:`CatalogError` / ``ShardError`` for an unreadable shard."""
        cur = self.db.execute(f"SELECT vector_id, {self._ref_cols} FROM files WHERE status = 'indexed' "
                              f"ORDER BY vector_id")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, self._vectors_of([r[1:] for r in rows], dim)

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All (ids ``[N]``, vectors ``[N, dim]``) at once."""
        parts = list(self.iter_vectors(dim))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def shard_rows(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The indexed rows whose vectors live in shards, by shard: (shard file name, rows in it
        ``[m]`` int64, their vector ids ``[m]`` int64), shards and rows in order."""
        if self.schema < 3:
            return []
        out: dict[str, list[tuple[int, int]]] = {}
        for shard, row, vid in self.db.execute("SELECT shard, shard_row, vector_id FROM files WHERE status = "
                                               "'indexed' AND shard IS NOT NULL ORDER BY shard, shard_row"):
            out.setdefault(from_db(shard), []).append((row, vid))
        return [(s, *np.array(v, np.int64).reshape(-1, 2).T) for s, v in out.items()]

    def paths_for(self, ids: Sequence[int]) -> dict[int, str]:
        """vector id -> path for the ids that exist (negative ids, FAISS's "none", are ignored)."""
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return {}
        q = f"SELECT vector_id, path FROM files WHERE vector_id IN ({','.join('?' * len(ids))})"
        return {vid: self._abs(p) for vid, p in self.db.execute(q, ids)}

    def vectors_for(self, ids: Sequence[int], dim: int) -> np.ndarray:
        """The vectors ``[m, dim]`` float32 of ``ids``, in the order asked (an id the catalog lacks:
        a zero row)."""
        ids = [int(i) for i in ids]
        found: dict[int, tuple] = {}
        for s in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[s:s + 900]
            found.update((r[0], r[1:]) for r in self.db.execute(
                f"SELECT vector_id, {self._ref_cols} FROM files WHERE vector_id IN ({','.join('?' * len(chunk))})",
                chunk))
        none = (None, None, None)
        return self._vectors_of([found.get(i, none) for i in ids], dim)

    def vector_for(self, vector_id: int, dim: int) -> np.ndarray | None:
        row = self.db.execute(f"SELECT {self._ref_cols} FROM files WHERE vector_id = ?", (int(vector_id),)).fetchone()
        return self._vectors_of([row], dim)[0] if row and (row[0] is not None or row[1] is not None) else None

    def id_for_path(self, path: str) -> int | None:
        row = self.db.execute("SELECT vector_id FROM files WHERE path = ? AND status = 'indexed'",
                              (self._rel(path),)).fetchone()
        return row[0] if row else None

    def path_for(self, vector_id: int) -> str | None:
        row = self.db.execute("SELECT path FROM files WHERE vector_id = ? AND status = 'indexed'",
                              (int(vector_id),)).fetchone()
        return self._abs(row[0]) if row else None

    # ------------------------------------------------------------------ photo metadata
    def _require_metadata(self) -> None:
        if self.schema < 2:
            raise CatalogError(f"{self.path.parent}: this index predates photo metadata (schema {self.schema}); "
                               f"run `dualsearch index` on it once to add dates, sizes and cameras")

    def count_missing_metadata(self) -> int:
        """Indexed rows whose metadata is not read yet, or read by an older reader."""
        return self.db.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed' AND (metadata_version IS NULL "
                               "OR metadata_version < ?)", (METADATA_VERSION,)).fetchone()[0]

    def missing_metadata(self, limit: int = 4096) -> list[tuple[int, str, int]]:
        """Up to ``limit`` indexed rows whose metadata is not read yet (or read by an older
        reader): (vector id, absolute path, mtime ns)."""
        rows = self.db.execute("SELECT vector_id, path, mtime_ns FROM files WHERE status = 'indexed' AND "
                               "(metadata_version IS NULL OR metadata_version < ?) LIMIT ?",
                               (METADATA_VERSION, limit))
        return [(vid, self._abs(p), m) for vid, p, m in rows]

    def write_metadata(self, rows: Sequence[tuple[int, PhotoMetadata]]) -> None:
        """Store metadata by vector id (one transaction). Does not bump the generation: the
        vectors, and so the ANN index, are unchanged."""
        cols = [name for name, _ in METADATA_COLUMNS if name != "metadata_version"]
        sql = (f"UPDATE files SET {', '.join(f'{c} = ?' for c in cols)}, metadata_version = ? "
               f"WHERE vector_id = ?")
        with self.transaction():
            self.db.executemany(sql, [(*(getattr(m, c) for c in cols), METADATA_VERSION, int(vid))
                                      for vid, m in rows])

    def metadata_for(self, ids: Sequence[int]) -> dict[int, dict]:
        """vector id -> its metadata fields (``METADATA_COLUMNS`` less the version, plus ``path``);
        fields are None where unknown. A schema-1 catalog answers paths only."""
        ids = [int(i) for i in ids if i >= 0]
        if not ids:
            return {}
        cols = [name for name, _ in METADATA_COLUMNS if name != "metadata_version"] if self.schema >= 2 else []
        q = (f"SELECT {', '.join(['vector_id', 'path', *cols])} FROM files "
             f"WHERE vector_id IN ({','.join('?' * len(ids))})")
        return {row[0]: {"path": self._abs(row[1]), **dict(zip(cols, row[2:]))} for row in self.db.execute(q, ids)}

    def filter_ids(self, where: "PhotoFilter") -> np.ndarray:
        """Sorted vector ids (int64) of the indexed images that pass ``where``. Raises
        :class:`CatalogError` on a schema-1 catalog when ``where`` needs metadata."""
        sql, args = where.sql(self._rel)
        if where.needs_metadata():
            self._require_metadata()
        cur = self.db.execute(f"SELECT vector_id FROM files WHERE status = 'indexed'{sql} ORDER BY vector_id", args)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def ids_by_date(self, where: "PhotoFilter", offset: int, limit: int) -> tuple[list[int], int]:
        """(vector ids of one page, total) of the indexed images that pass ``where``, newest
        first (undated last, then by id)."""
        sql, args = where.sql(self._rel)
        if self.schema < 2:
            self._require_metadata()
        total = self.db.execute(f"SELECT COUNT(*) FROM files WHERE status = 'indexed'{sql}", args).fetchone()[0]
        rows = self.db.execute(f"SELECT vector_id FROM files WHERE status = 'indexed'{sql} ORDER BY taken IS NULL, "
                               f"taken DESC, vector_id LIMIT ? OFFSET ?", [*args, int(limit), int(offset)])
        return [r[0] for r in rows], total

    def dates_for(self, ids: Sequence[int]) -> dict[int, str | None]:
        """vector id -> its ``taken`` ISO date-time (None when unknown)."""
        if self.schema < 2:
            return {int(i): None for i in ids}
        ids = [int(i) for i in ids if i >= 0]
        out: dict[int, str | None] = {}
        for s in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[s:s + 900]
            out.update(self.db.execute(f"SELECT vector_id, taken FROM files WHERE vector_id IN "
                                       f"({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    def library_summary(self, top: int = 50) -> dict:
        """What the index holds, for a landing page: count, date range, top-level folders, cameras
        and formats with their counts (largest first, at most ``top`` of each)."""
        n = self.count()
        if self.schema < 2:
            return {"images": n, "date_min": None, "date_max": None, "folders": [], "cameras": [], "formats": []}
        lo, hi = self.db.execute("SELECT MIN(taken), MAX(taken) FROM files WHERE status = 'indexed'").fetchone()

        def counts(expr: str) -> list[dict]:
            rows = self.db.execute(f"SELECT {expr} AS v, COUNT(*) AS c FROM files WHERE status = 'indexed' "
                                   f"GROUP BY v HAVING v IS NOT NULL AND v != '' ORDER BY c DESC, v LIMIT ?", (top,))
            return [{"name": from_db(v), "count": c} for v, c in rows]

        folder = ("CASE WHEN path LIKE '/%' OR instr(path, '://') > 0 OR instr(path, '/') = 0 THEN NULL "
                  "ELSE substr(path, 1, instr(path, '/') - 1) END")
        camera = "trim(coalesce(camera_make, '') || ' ' || coalesce(camera_model, ''))"
        return {"images": n, "date_min": lo, "date_max": hi, "folders": counts(folder), "cameras": counts(camera),
                "formats": counts("format")}

    def close(self) -> None:
        self.db.close()
