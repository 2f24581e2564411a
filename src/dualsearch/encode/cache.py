"""The feature cache of frozen towers, and where dualsearch keeps its caches.

One SQLite file per tower fingerprint (spec + preprocessing + weights), keyed per item: an image
by its file identity (path, tar member, size, mtime), a caption by its text. It is reused across
runs and data sets; a changed file gets a new key and a changed tower a new file. A partly
trainable tower's activations at its cut point have a file of their own, named by the tower
fingerprint and the cut point (:func:`activation_cache`). Torch-free.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.records import ImageRef


def default_cache_dir() -> Path:
    """``$DUALSEARCH_CACHE``, else ``~/.cache/dualsearch``: the root for feature caches
    (``features/``) and verified ONNX exports (``onnx/``)."""
    return Path(os.environ.get("DUALSEARCH_CACHE", Path.home() / ".cache" / "dualsearch"))


class FeatureCache:
    """SQLite key -> vector store for one tower (exact: cached and fresh runs agree).

    Lives at ``root/features/<tower fingerprint>.sqlite``; vectors are ``[dim]`` float32 (``dtype``:
    another element type; rows are flat and may differ in length: the caller reshapes them)."""

    def __init__(self, root: str | os.PathLike, tower_fingerprint: str, dim: int, dtype=np.float32):
        folder = Path(root) / "features"
        folder.mkdir(parents=True, exist_ok=True)
        self.root = Path(root)
        self.path = folder / f"{tower_fingerprint}.sqlite"
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` (absent keys are left out)."""
        out: dict[str, np.ndarray] = {}
        for s in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = list(keys[s:s + 900])
            q = f"SELECT key, vec FROM features WHERE key IN ({','.join('?' * len(chunk))})"
            for k, blob in self.db.execute(q, chunk):
                out[k] = np.frombuffer(blob, dtype=self.dtype)
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store ``(key, vector)`` pairs in one transaction."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?)",
                                [(k, np.asarray(v, dtype=self.dtype).tobytes()) for k, v in items])

    def close(self) -> None:
        self.db.close()


def image_key(ref: ImageRef) -> str:
    """Cache key of an image: SHA-1 of its identity (path, member, size, mtime, or its bytes)."""
    return hashlib.sha1(repr(ref.identity()).encode()).hexdigest()


def text_key(text: str) -> str:
    """Cache key of a caption: SHA-1 of its UTF-8 text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def open_caches(model, cache_root: str | os.PathLike | None) -> tuple[FeatureCache | None, FeatureCache | None]:
    """Caches for the model's frozen towers under ``cache_root`` (None for a trainable tower, or
    both None when ``cache_root`` is None: caching disabled)."""
    if cache_root is None:
        return None, None
    img, txt = model.image_tower, model.text_tower
    return (FeatureCache(cache_root, img.fingerprint(), img.output_dim) if img.is_frozen else None,
            FeatureCache(cache_root, txt.fingerprint(), txt.output_dim) if txt.is_frozen else None)


def activation_cache(root: str | os.PathLike, tower_fingerprint: str, cut: int) -> FeatureCache:
    """The cache of a tower's activations at block ``cut`` (the input of its first trainable block),
    float16, one flat row per item: ``root/features/<tower fingerprint>-cut<cut>.sqlite``. The
    fingerprint covers every weight and the file name the cut point, so another ``last:N`` or a
    changed frozen part never reads stale activations."""
    return FeatureCache(root, f"{tower_fingerprint}-cut{int(cut)}", 0, dtype=np.float16)
