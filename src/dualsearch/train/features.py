"""Tower features: batched computation through a DataLoader, and an on-disk cache for frozen towers.

The cache is one SQLite file per tower fingerprint (spec + preprocessing + weights), keyed per
item: an image by its file identity (path, tar member, size, mtime), a caption by its text. It is
reused across runs and data sets; a changed file gets a new key and a changed tower a new file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import ImageLoadError, load_image
from ..data.records import ImageCaption, ImageRef, SkipLog
from ..model.towers import ImageTower, TextTower

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUALSEARCH_CACHE", Path.home() / ".cache" / "dualsearch"))


def default_workers() -> int:
    return min(4, max(1, (os.cpu_count() or 2) - 1))


# ----------------------------------------------------------------------------- loading pixels
class ImageFileDataset(Dataset):
    """Decodes and preprocesses images; a bad image yields ``(index, None, reason)``."""

    def __init__(self, refs: Sequence[ImageRef | str], preprocess: Callable, target_size: int,
                 max_pixels: int | None = None):
        self.refs = list(refs)
        self.preprocess = preprocess
        self.target_size = target_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        try:
            img = load_image(self.refs[i], target_size=self.target_size, **kwargs)
            return i, self.preprocess(img), None
        except ImageLoadError as e:
            return i, None, e.reason


def collate_images(batch):
    """-> (indices of good images, pixels [B,3,S,S] or None, [(index, reason)] of bad ones)."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, r) for i, x, r in batch if x is None]
    if not good:
        return [], None, bad
    return [i for i, _ in good], torch.stack([x for _, x in good]), bad


def image_loader(refs: Sequence, tower: ImageTower, batch_size: int = 64, num_workers: int | None = None,
                 max_pixels: int | None = None) -> DataLoader:
    workers = default_workers() if num_workers is None else num_workers
    ds = ImageFileDataset(refs, tower.preprocessor(), tower.image_size, max_pixels)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


# ----------------------------------------------------------------------------- the cache
class FeatureCache:
    """SQLite key -> float32 vector store for one tower (exact: cached and fresh runs agree)."""

    def __init__(self, root: str | os.PathLike, tower_fingerprint: str, dim: int):
        root = Path(root) / "features"
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{tower_fingerprint}.sqlite"
        self.dim = dim
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in range(0, len(keys), 900):
            chunk = list(keys[s:s + 900])
            q = f"SELECT key, vec FROM features WHERE key IN ({','.join('?' * len(chunk))})"
            for k, blob in self.db.execute(q, chunk):
                out[k] = np.frombuffer(blob, dtype=np.float32)
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?)",
                                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items])

    def close(self) -> None:
        self.db.close()


def image_key(ref: ImageRef) -> str:
    return hashlib.sha1(repr(ref.identity()).encode()).hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- computing features
def _fill_from_cache(cache: FeatureCache | None, keys: Sequence[str], feats: np.ndarray, n: int) -> list[int]:
    """Copy cached rows into ``feats``; return the indices still to compute."""
    if cache is None:
        return list(range(n))
    found = cache.get_many(keys)
    todo = []
    for i, k in enumerate(keys):
        if k in found:
            feats[i] = found[k]
        else:
            todo.append(i)
    return todo


@torch.inference_mode()
def compute_image_features(tower: ImageTower, refs: Sequence[ImageRef], cache: FeatureCache | None = None,
                           batch_size: int = 64, num_workers: int | None = None, device: str = "cpu",
                           skipped: SkipLog | None = None, desc: str = "image features",
                           engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Tower features for ``refs`` -> (features ``[N, F]`` float32, ok mask ``[N]``).

    Bad images get a zero row, ``ok=False`` and an entry in ``skipped``."""
    feats = np.zeros((len(refs), tower.output_dim), dtype=np.float32)
    keys = [image_key(r) for r in refs] if cache else []
    todo = _fill_from_cache(cache, keys, feats, len(refs))
    ok = np.ones(len(refs), dtype=bool)
    ok[todo] = False
    if cache:
        log.info("%s: %d cached, %d to compute", desc, len(refs) - len(todo), len(todo))
    if not todo:
        return feats, ok
    from ..engine import image_forward

    onnx_dir = cache.path.parent.parent if cache else None
    forward, used = image_forward(tower, tower.fingerprint(), tower.image_size, engine, device, onnx_dir)
    loader = image_loader([refs[i] for i in todo], tower, batch_size, num_workers)
    t0 = time.perf_counter()
    with tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for idx, pixels, bad in loader:
            for j, reason in bad:
                if skipped is not None:
                    skipped.add(refs[todo[j]].name, reason)
            if pixels is not None:
                out = forward(pixels)
                rows = [todo[j] for j in idx]
                feats[rows], ok[rows] = out, True
                if cache:
                    cache.put_many([(keys[r], out[n]) for n, r in enumerate(rows)])
            bar.update(len(idx) + len(bad))
    log.info("%s: %d images in %.1f s (%s)", desc, len(todo), time.perf_counter() - t0, used)
    return feats, ok


@torch.inference_mode()
def compute_text_features(tower: TextTower, texts: Sequence[str], cache: FeatureCache | None = None,
                          batch_size: int = 256, device: str = "cpu", desc: str = "text features",
                          engine: str = "auto") -> np.ndarray:
    """Tower features for ``texts`` -> ``[M, F]`` float32."""
    feats = np.zeros((len(texts), tower.output_dim), dtype=np.float32)
    keys = [text_key(t) for t in texts] if cache else []
    todo = _fill_from_cache(cache, keys, feats, len(texts))
    if not todo:
        return feats
    from ..engine import text_forward

    onnx_dir = cache.path.parent.parent if cache else None
    forward, used = text_forward(tower, tower.fingerprint(), engine, device, onnx_dir)
    # sort by length so that padding stays short
    todo.sort(key=lambda i: len(texts[i]))
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch"):
        rows = todo[s:s + batch_size]
        out = forward(tower.tokenize([texts[i] for i in rows]))
        feats[rows] = out
        if cache:
            cache.put_many([(keys[r], out[n]) for n, r in enumerate(rows)])
    log.info("%s: %d texts in %.1f s (%s)", desc, len(todo), time.perf_counter() - t0, used)
    return feats


def open_caches(model, cache_dir: str | os.PathLike | None) -> tuple[FeatureCache | None, FeatureCache | None]:
    """Caches for the model's frozen towers (None for a trainable tower or when disabled)."""
    if cache_dir is None:
        return None, None
    img = model.image_tower
    txt = model.text_tower
    return (FeatureCache(cache_dir, img.fingerprint(), img.output_dim) if img.is_frozen else None,
            FeatureCache(cache_dir, txt.fingerprint(), txt.output_dim) if txt.is_frozen else None)


def flatten_captions(records: Sequence[ImageCaption]) -> tuple[list[str], np.ndarray]:
    """All captions and, for each, the index of its image."""
    texts, owner = [], []
    for i, r in enumerate(records):
        texts.extend(r.captions)
        owner.extend([i] * len(r.captions))
    return texts, np.asarray(owner, dtype=np.int64)
