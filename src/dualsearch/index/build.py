"""Embed a folder of images into an index folder, incrementally.

INDEX/
  catalog.sqlite   files, statuses, vectors (source of truth; committed in batches)
  vectors.faiss    the ANN index built from the catalog (rebuilt when the catalog changed)
  manifest.json    model (path + content hash), dimension, metric, count, ANN kind and parameters
Re-running embeds only new and changed files and drops deleted ones; a run killed at any point
resumes from the last committed batch.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..data.captions import DataError, list_images
from ..model.dual_encoder import DualEncoder
from .manifest import (ANN_FILE, MANIFEST_FILE, MANIFEST_VERSION, TEXT_ENCODER_DIR, IndexError_,  # noqa: F401
                       model_content_hash, read_manifest, write_manifest)
from ..train.features import image_loader
from . import ann
from .catalog import Catalog

log = logging.getLogger(__name__)

@dataclass
class IndexReport:
    found: int = 0
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    engine: str = ""
    kind: str = ""
    count: int = 0
    embedded: int = 0  # images embedded by this run (the rest of ``added`` came from shards written before)
    tars: int = 0  # WebDataset shards among the inputs (``found`` counts the other files)
    worker_peak_mb: float = 0.0  # Spark: the largest Python worker's peak RSS

    def summary(self) -> str:
        reasons = Counter(r.split(" (")[0] for _, r in self.skipped)
        skipped = f"{len(self.skipped)} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})"
                                                    if reasons else "")
        rate = (self.embedded or self.added) / self.embed_seconds if self.embed_seconds else 0.0
        engine = f", {self.engine}" if self.engine else ""
        found = " and ".join(([f"{self.found} images"] if self.found or not self.tars else [])
                             + ([f"{self.tars} WebDataset shards"] if self.tars else []))
        return (f"{found} found: {self.added} embedded ({rate:.1f} img/s{engine}), {self.unchanged} unchanged, "
                f"{self.removed} removed, {skipped}; index: {self.count} vectors ({self.kind})")


def _check_model(catalog: Catalog, model_hash: str, model_path: str) -> None:
    recorded = catalog.get_meta("model_hash")
    if recorded and recorded != model_hash:
        raise IndexError_(f"{catalog.path.parent}: built with another model ({catalog.get_meta('model_path')}, "
                          f"hash {recorded}); index into a new folder, or pass that model")
    if not recorded:
        with catalog.db:
            catalog.set_meta("model_hash", model_hash)
            catalog.set_meta("model_path", model_path)


def plan(catalog: Catalog, files: Sequence[Path]) -> tuple[list[tuple[str, int, int]], int, list[str]]:
    """-> (files to embed as (path, size, mtime_ns), unchanged count, catalog paths gone from disk)."""
    known = catalog.stats()
    todo, unchanged, seen = [], 0, set()
    for p in files:
        path = os.path.abspath(p)
        seen.add(path)
        try:
            st = p.stat()
        except OSError:  # a dangling link, a file gone since listing: the loader reports the reason
            todo.append((path, -1, 0))
            continue
        if known.get(path) == (st.st_size, st.st_mtime_ns):
            unchanged += 1
        else:
            todo.append((path, st.st_size, st.st_mtime_ns))
    gone = [p for p in known if p not in seen]
    return todo, unchanged, gone


def _images_root(src: str, inputs) -> str:
    if os.path.isdir(src):
        return os.path.abspath(src)
    local = [p for p, _, _ in inputs.files if "://" not in p] + [t for t, _, _ in inputs.tars]
    return os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""


def build_index_spark(src: str, model_path: str | os.PathLike, out: str | os.PathLike, kind: str = "auto",
                      exclude: Sequence[str] = (), batch_size: int = 64, shard_size: int | None = None,
                      master: str | None = None, embeddings: str | None = None, memory_budget: float = 8e9,
                      max_pixels: int | None = None, spark=None) -> IndexReport:
    """Index ``src`` (a folder, a list of paths or URIs, or WebDataset shards) with the embedding
    spread over Spark executors (see :mod:`dualsearch.index.spark`)."""
    from . import spark as sp

    if kind not in ann.KINDS:
        raise IndexError_(f"unknown --ann {kind!r}: choose one of {', '.join(ann.KINDS)}")
    shard_size = sp.DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if shard_size < 1:  # before anything is read or changed
        raise sp.SparkIndexError(f"--shard-size must be at least 1, got {shard_size}")
    t0 = time.perf_counter()
    out = Path(out)
    src = str(src)
    model_path = str(Path(model_path).resolve())
    model = DualEncoder.load(model_path)
    model_hash = model_content_hash(model_path)
    dim = model.config.embed_dim
    inputs = sp.list_inputs(src, exclude)
    catalog = Catalog(out, create=True)
    try:
        _check_model(catalog, model_hash, model_path)
        known = catalog.stats()
        files = [f for f in inputs.files if f[1] < 0 or known.get(f[0]) != (f[1], f[2])]
        tars_ingested = catalog.meta_with_prefix(sp.TAR_META)
        tars = [t for t in inputs.tars if tars_ingested.get(sp.TAR_META + t[0]) != f"{t[1]}:{t[2]}"]
        file_set, tar_set = {f[0] for f in inputs.files}, {t[0] for t in inputs.tars}
        gone = [p for p in known if p not in file_set and p.split("::", 1)[0] not in tar_set]
        report = IndexReport(found=len(inputs.files), tars=len(inputs.tars),
                             unchanged=len(inputs.files) - len(files))
        with catalog.db:
            for key in tars_ingested:
                if key[len(sp.TAR_META):] not in tar_set:
                    catalog.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        report.removed = catalog.remove(gone)
        parts = sp.make_parts(files, tars, shard_size, model_hash)
        out_uri = embeddings or str(out / sp.EMBEDDINGS_DIR)
        done = sp.done_parts(out_uri)
        pending = [p for p in parts if p.file not in done]
        shards = f"{len(pending)} shards embedded, {len(parts) - len(pending)} reused"
        report.engine = f"spark, {shards}"
        if pending:
            from ..engine import NormalizedImageEncoder, verified_onnx
            from ..train.features import default_cache_dir

            verified = verified_onnx(NormalizedImageEncoder(model), f"encoder-{model_hash}",
                                     model.image_tower.image_size, default_cache_dir())
            if verified is None:
                raise IndexError_("the Spark engine ships the image encoder as ONNX, and this model's did not "
                                  "export; index with --engine torch instead")
            session = spark or sp.spark_session(master)
            log.info("embedding %d shards on Spark (%s); %d already written", len(pending),
                     session.sparkContext.master, len(parts) - len(pending))
            t1 = time.perf_counter()
            stats = sp.run_parts(session, pending, str(verified[0]), model.image_tower.preprocessor(), out_uri,
                                 batch_size, max_pixels)
            report.embed_seconds = time.perf_counter() - t1
            report.embedded = sum(r[1] for r in stats)
            report.worker_peak_mb = max(r[4] for r in stats)
            log.info("Spark: %d shards in %.1f s; a shard took %.1f-%.1f s; Python workers peaked at %.0f MiB",
                     len(stats), report.embed_seconds, min(r[3] for r in stats), max(r[3] for r in stats),
                     report.worker_peak_mb)
            report.engine = f"spark {session.sparkContext.master}, {shards}"
        for part in parts:  # in plan order: a run killed while ingesting re-cuts the same parts
            n_ok, _ = sp.ingest(catalog, part, out_uri, dim)
            report.added += n_ok
        sp.remove_abandoned(catalog, out_uri, parts)
        report.skipped = [(p, r) for p, r in catalog.skipped()]
        with catalog.db:
            catalog.set_meta("images_root", _images_root(src, inputs))
        report.seconds = time.perf_counter() - t0
        finish(catalog, out, model, model_path, model_hash, kind, memory_budget, report)
    finally:
        catalog.close()
    return report


def build_index(images_dir: str | os.PathLike, model_path: str | os.PathLike, out: str | os.PathLike,
                kind: str = "auto", exclude: Sequence[str] = (), batch_size: int = 64,
                num_workers: int | None = None, commit_every: int = 256, memory_budget: float = 8e9,
                device: str = "cpu", progress: bool = True, max_pixels: int | None = None,
                engine: str = "auto") -> IndexReport:
    """Index every image below ``images_dir`` into ``out`` (see the module docstring)."""
    if kind not in ann.KINDS:
        raise IndexError_(f"unknown --ann {kind!r}: choose one of {', '.join(ann.KINDS)}")
    t0 = time.perf_counter()
    out = Path(out)
    model_path = str(Path(model_path).resolve())
    model = DualEncoder.load(model_path, device=device)
    model_hash = model_content_hash(model_path)
    catalog = Catalog(out, create=True)
    try:
        _check_model(catalog, model_hash, model_path)
        if not os.path.isdir(images_dir):
            raise DataError(f"{images_dir}: not a folder (lists of paths or URIs and WebDataset shards are "
                            f"indexed with --engine spark, which runs on this machine too)")
        files = list_images(images_dir, exclude)
        if not files and any(Path(images_dir).glob("*.tar")):
            raise DataError(f"{images_dir}: no images here, only .tar files: index WebDataset shards with "
                            f"--engine spark")
        todo, unchanged, gone = plan(catalog, files)
        report = IndexReport(found=len(files), unchanged=unchanged, removed=catalog.remove(gone))
        embed_files(model, model_hash, catalog, todo, report, batch_size, num_workers, commit_every, progress,
                    max_pixels, engine)
        report.seconds = time.perf_counter() - t0
        report.skipped = [(p, r) for p, r in catalog.skipped()]
        with catalog.db:
            catalog.set_meta("images_root", os.path.abspath(images_dir))
        finish(catalog, out, model, model_path, model_hash, kind, memory_budget, report)
    finally:
        catalog.close()
    return report


def index_vectors(out: str | os.PathLike, model_path: str | os.PathLike, paths: Sequence[str],
                  vectors: np.ndarray, kind: str = "auto", memory_budget: float = 8e9,
                  images_root: str | None = None, batch: int = 50_000) -> IndexReport:
    """Build an index from vectors computed elsewhere (one unit vector per path), recorded with the
    model that will embed queries. Paths already in the index are replaced."""
    if kind not in ann.KINDS:
        raise IndexError_(f"unknown --ann {kind!r}: choose one of {', '.join(ann.KINDS)}")
    t0 = time.perf_counter()
    out = Path(out)
    model_path = str(Path(model_path).resolve())
    model = DualEncoder.load(model_path)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != model.config.embed_dim or len(vectors) != len(paths):
        raise IndexError_(f"expected {len(paths)} vectors of dimension {model.config.embed_dim}, got "
                          f"shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    catalog = Catalog(out, create=True)
    try:
        model_hash = model_content_hash(model_path)
        _check_model(catalog, model_hash, model_path)
        for s in range(0, len(paths), batch):
            catalog.write_batch([(p, 0, 0, v) for p, v in zip(paths[s:s + batch], vectors[s:s + batch])], [])
        with catalog.db:
            catalog.set_meta("images_root", os.path.abspath(images_root) if images_root else "")
        report = IndexReport(found=len(paths), added=len(paths), seconds=time.perf_counter() - t0)
        finish(catalog, out, model, model_path, model_hash, kind, memory_budget, report)
    finally:
        catalog.close()
    return report


def embed_files(model: DualEncoder, model_hash: str, catalog: Catalog, todo: list[tuple[str, int, int]],
                report: IndexReport, batch_size: int, num_workers: int | None, commit_every: int, progress: bool,
                max_pixels: int | None = None, engine: str = "auto") -> None:
    """Embed ``todo`` in batches, committing every ``commit_every`` files."""
    if not todo:
        return
    from ..engine import NormalizedImageEncoder, image_forward

    forward, used = image_forward(NormalizedImageEncoder(model), f"encoder-{model_hash}",
                                  model.image_tower.image_size, engine, str(model.device))
    loader = image_loader([t[0] for t in todo], model.image_tower, batch_size, num_workers, max_pixels)
    good, bad = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress) as bar:
        for idx, pixels, failed in loader:
            if pixels is not None:
                vecs = forward(pixels)
                good += [(*todo[i], v) for i, v in zip(idx, vecs)]
            bad += [(*todo[i], reason) for i, reason in failed]
            if len(good) + len(bad) >= commit_every:
                catalog.write_batch(good, bad)
                report.added += len(good)
                good, bad = [], []
            bar.update(len(idx) + len(failed))
    catalog.write_batch(good, bad)
    report.added += len(good)
    report.embed_seconds = time.perf_counter() - t0
    report.engine = used
    log.info("embedded %d images in %.1f s (%s)", len(todo), report.embed_seconds, used)


def ensure_text_encoder(out: Path, model: DualEncoder, model_hash: str) -> None:
    """Export the model's text encoder to ONNX inside the index (once per model), so that queries
    are answered without torch. A model that does not export is searched through torch."""
    from ..export import export_text_encoder

    folder = out / TEXT_ENCODER_DIR
    try:
        if json.loads((folder / "export.json").read_text()).get("model_hash") == model_hash:
            return
    except (OSError, ValueError):
        pass
    import shutil

    from ..onnx_text import OnnxTextEncoder

    probe = ["a red circle", "two small blue stars above a large green square on a pink background", "x"]
    try:
        export_text_encoder(model, folder, extra={"model_hash": model_hash})
        diff = float(np.abs(OnnxTextEncoder(folder).embed(probe) - model.embed_texts(probe)).max())
    except Exception as e:  # an exotic tower the exporter cannot trace: torch answers queries
        log.warning("could not export the text encoder to ONNX (%s); search will use torch", e)
        shutil.rmtree(folder, ignore_errors=True)
        return
    if diff > 1e-3:
        log.warning("the ONNX text encoder differs from torch by %.2g; search will use torch", diff)
        shutil.rmtree(folder, ignore_errors=True)


def finish(catalog: Catalog, out: Path, model: DualEncoder, model_path: str, model_hash: str, kind: str,
           memory_budget: float, report: IndexReport) -> None:
    """(Re)build the ANN index when the catalog changed since it was last built, and the manifest."""
    dim = model.config.embed_dim
    ensure_text_encoder(out, model, model_hash)
    manifest = read_manifest(out) if (out / MANIFEST_FILE).is_file() else None
    stale = (manifest is None or manifest.get("generation") != catalog.generation
             or not (out / ANN_FILE).is_file() or (kind != "auto" and manifest["ann"]["kind"] != kind))
    if not stale:
        report.kind, report.count = manifest["ann"]["kind"], manifest["count"]
        return
    n = catalog.count()
    built = ann.build_stream(lambda: catalog.iter_vectors(dim), n, dim, kind, memory_budget)
    ann.write(built.index, out / ANN_FILE)
    write_manifest(out, {
        "format_version": MANIFEST_VERSION, "model": {"path": model_path, "hash": model_hash},
        "dim": dim, "metric": "inner_product", "count": n, "generation": catalog.generation,
        "images_root": catalog.get_meta("images_root"),
        "ann": {"kind": built.kind, "params": built.params, "tuned_recall_at_10": round(built.recall, 4)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    report.kind, report.count = built.kind, n
