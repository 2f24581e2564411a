"""Build an index folder, incrementally: the prologue both runners share, and the epilogue.

:func:`build_index` (a folder, embedded in this process: :mod:`.local`),
:func:`build_index_spark` (a folder, list or WebDataset shards, embedded on Spark: :mod:`.spark`)
and :func:`index_vectors` (vectors computed elsewhere) all open an :class:`IndexJob` (the model
loaded and hashed, the catalog opened and bound to that model), bring the catalog in line with
their inputs (:mod:`.plan`), and :func:`finish`: the ANN index and manifest rebuilt when the
catalog changed. Re-running embeds only new and changed files and drops deleted ones; a run
killed at any point resumes from the last committed batch. Layout: :mod:`.manifest`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..config import ModelConfig, from_dict
from ..data.images import is_uri
from ..data.readers import DataError
from ..model.folder import model_content_hash, read_model_config
from ..storage import StorageError
from . import ann, qbnorm
from .catalog import CATALOG_FILE, Catalog, IndexedFile
from .interop import check_vectors
from .manifest import (
    ANN_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    TEXT_ENCODER_DIR,
    IndexError_,
    read_manifest,
    write_manifest,
)
from .photos import calibrate, fill_metadata
from .plan import Inputs, Plan, diff, list_folder, list_inputs

if TYPE_CHECKING:
    from ..model.dual_encoder import DualEncoder

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What a run did; :meth:`summary` is the line the CLI prints."""

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
    notes: list[str] = field(default_factory=list)  # ignored files by extension, unreadable folders, loops

    def summary(self) -> str:
        reasons = Counter(r.split(" (")[0] for _, r in self.skipped)
        skipped = f"{len(self.skipped)} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})"
                                                    if reasons else "")
        rate = (self.embedded or self.added) / self.embed_seconds if self.embed_seconds else 0.0
        engine = f", {self.engine}" if self.engine else ""
        found = " and ".join(([f"{self.found} images"] if self.found or not self.tars else [])
                             + ([f"{self.tars} WebDataset shards"] if self.tars else []))
        notes = "".join(f"; {n}" for n in self.notes)
        return (f"{found} found: {self.added} embedded ({rate:.1f} img/s{engine}), {self.unchanged} unchanged, "
                f"{self.removed} removed, {skipped}; index: {self.count} vectors ({self.kind}){notes}")


@dataclass
class IndexJob:
    """One run's model and catalog (see :func:`index_job`); the torch model is loaded on first
    use of :attr:`model`, so a run with a verified ONNX export never imports torch."""

    out: Path
    model_path: str
    model_hash: str
    catalog: Catalog
    kind: str
    memory_budget: float
    dim: int
    device: str = "cpu"
    t0: float = field(default_factory=time.perf_counter)
    _model: DualEncoder | None = None
    _query_encoder: Callable[[Sequence[str]], np.ndarray] | None = None

    @property
    def query_encoder(self) -> Callable[[Sequence[str]], np.ndarray]:
        """Texts -> unit vectors ``[n, D]`` as queries are encoded: the index's ONNX text encoder,
        else the torch model; loaded once a run (the calibration and the hubness statistics share it)."""
        if self._query_encoder is None:
            from ..encode.onnx_encoders import load_text_encoder

            encoder = load_text_encoder(self.out / TEXT_ENCODER_DIR, self.model_hash)
            self._query_encoder = encoder.embed if encoder is not None else self.model.embed_texts
        return self._query_encoder

    @property
    def model(self) -> DualEncoder:
        """The :class:`~dualsearch.model.dual_encoder.DualEncoder`, loaded (torch) on first use."""
        if self._model is None:
            from ..model.dual_encoder import DualEncoder

            self._model = DualEncoder.load(self.model_path, device=self.device)
        return self._model


def check_kind(kind: str) -> None:
    if kind not in ann.KINDS:
        raise IndexError_(f"unknown --ann {kind!r}: choose one of {', '.join(ann.KINDS)}")


@contextmanager
def index_job(out: str | os.PathLike, model_path: str | os.PathLike, kind: str = "auto",
              memory_budget: float = 8e9, device: str = "cpu") -> Iterator[IndexJob]:
    """The prologue every run shares: the model checked and hashed, the catalog in ``out`` opened
    (created when new) and bound to that model; the catalog is closed on the way out. Raises
    :class:`IndexError_` for an unknown ANN kind, ``ModelError``, and ``CatalogError`` when the
    index holds another model's vectors."""
    check_kind(kind)
    model_path = str(Path(model_path).resolve())
    config = read_model_config(model_path)  # the cheap checks first: a wrong pairing fails before any model
    model_hash = model_content_hash(model_path)
    catalog = Catalog(out, create=True)
    try:
        catalog.bind_model(model_hash, model_path)
        dim = from_dict(ModelConfig, config.get("model") or {}).embed_dim
        yield IndexJob(Path(out), model_path, model_hash, catalog, kind, memory_budget, dim, device)
    finally:
        catalog.close()


MASS_DELETE_FRACTION = 0.5  # a run that would drop more of the catalog than this stops and asks


def apply_removals(catalog: Catalog, plan: Plan, inputs: Inputs, src: str, report: IndexReport,
                   allow_mass_delete: bool = False) -> None:
    """Drop the rows of files gone from the inputs, and the records of shards no longer listed.

    "Cannot see it" is not "deleted": a source with no images at all never drops rows, and a run
    that would drop more than half of the catalog stops unless ``allow_mass_delete`` (a network
    share that is not mounted looks like an empty folder). Raises :class:`DataError`."""
    known = catalog.count() + catalog.count("skipped")
    notes = "".join(f"; {n}" for n in inputs.listing.notes())
    if not len(inputs):
        kept = f"; the index keeps its {known} files (is the folder mounted?)" if known else ""
        raise DataError(f"{src}: no images found{notes}{kept}")
    if len(plan.gone) > 1 and len(plan.gone) > MASS_DELETE_FRACTION * known and not allow_mass_delete:
        raise DataError(f"{src}: this run would remove {len(plan.gone)} of the index's {known} files (not found "
                        f"any more, e.g. {plan.gone[0]}); if they are really gone, run again with "
                        f"--allow-mass-delete")
    report.removed = catalog.remove(plan.gone)
    catalog.delete_meta(plan.stale_tar_keys)
    report.notes = inputs.listing.notes()


def _images_root(src: str, inputs: Inputs) -> str:
    """The folder that holds every indexed local file (what the server may serve from)."""
    if os.path.isdir(src):
        return os.path.abspath(src)
    local = [f.path for f in inputs.files if "://" not in f.path] + [t.path for t in inputs.tars]
    return os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""


def _require_images(src: str, inputs: Inputs, out: str | os.PathLike) -> None:
    """A source with no image at all is an error before anything is written (an existing index
    gets the longer message of :func:`apply_removals`)."""
    if not len(inputs) and not (Path(out) / CATALOG_FILE).is_file():
        raise DataError(f"{src}: no images found" + "".join(f"; {n}" for n in inputs.listing.notes()))


def _list_local(images_dir: str, exclude: Sequence[str]) -> Inputs:
    if os.path.isfile(images_dir) and (images_dir.endswith((".tar", ".txt", ".lst", ".list", ".csv"))):
        raise DataError(f"{images_dir}: WebDataset shards and lists of paths or URIs are indexed with "
                        f"--engine spark (which runs on this machine too)")
    if any(ch in images_dir for ch in "*?[{"):
        raise DataError(f"{images_dir}: a pattern of WebDataset shards is indexed with --engine spark (which "
                        f"runs on this machine too)")
    if os.path.exists(images_dir) and not os.path.isdir(images_dir):
        raise DataError(f"{images_dir}: not a folder (give the folder that holds the images)")
    inputs = list_folder(images_dir, exclude)
    if not inputs.files and any(Path(images_dir).glob("*.tar")):
        raise DataError(f"{images_dir}: no images here, only .tar files: index WebDataset shards with "
                        f"--engine spark")
    return inputs


def build_index(images_dir: str | os.PathLike, model_path: str | os.PathLike, out: str | os.PathLike,
                kind: str = "auto", exclude: Sequence[str] = (), batch_size: int = 64,
                num_workers: int | None = None, commit_every: int = 256, memory_budget: float = 8e9,
                device: str = "cpu", progress: bool = True, max_pixels: int | None = None,
                engine: str = "auto", allow_mass_delete: bool = False, precision: str = "fp32") -> IndexReport:
    """Index every image below ``images_dir`` into ``out``, embedding in this process (see the
    module docstring, :func:`apply_removals` and :func:`.local.embed_files` for ``engine`` and
    ``precision``). Raises :class:`~dualsearch.errors.DualsearchError`
    subclasses."""
    check_kind(kind)
    inputs = _list_local(str(images_dir), exclude)
    _require_images(str(images_dir), inputs, out)

    with index_job(out, model_path, kind, memory_budget, device) as job:
        job.catalog.set_root(os.path.abspath(images_dir))  # relative rows follow a moved folder
        plan = diff(job.catalog, inputs)
        report = IndexReport(found=len(inputs.files), unchanged=plan.unchanged)
        apply_removals(job.catalog, plan, inputs, str(images_dir), report, allow_mass_delete)
        from .local import embed_files

        embed_files(job, plan.todo, report, batch_size, num_workers, commit_every, progress, max_pixels, engine,
                    precision)
        finish(job, report)
    return report


def build_index_spark(src: str, model_path: str | os.PathLike, out: str | os.PathLike, kind: str = "auto",
                      exclude: Sequence[str] = (), batch_size: int = 64, shard_size: int | None = None,
                      master: str | None = None, embeddings: str | None = None, memory_budget: float = 8e9,
                      max_pixels: int | None = None, spark=None, allow_mass_delete: bool = False) -> IndexReport:
    """Index ``src`` (a folder, a list of paths or URIs, or WebDataset shards) with the embedding
    spread over Spark executors (see :mod:`dualsearch.index.spark`)."""
    from ..errors import UsageError
    from . import distributed
    from . import spark as sp

    check_kind(kind)
    shard_size = sp.DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if shard_size < 1:  # before anything is read or changed
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    inputs = list_inputs(str(src), exclude)
    _require_images(str(src), inputs, out)
    with index_job(out, model_path, kind, memory_budget) as job:
        job.catalog.set_root(_images_root(str(src), inputs), move=os.path.isdir(str(src)))
        shards = sp.prepare_shards(job.catalog, embeddings, str(job.out / sp.EMBEDDINGS_DIR))
        plan = diff(job.catalog, inputs)
        report = IndexReport(found=len(inputs.files), tars=len(inputs.tars), unchanged=plan.unchanged)
        apply_removals(job.catalog, plan, inputs, str(src), report, allow_mass_delete)
        sp.run_plan(job, plan, report, shards, shard_size, batch_size, max_pixels, master, spark)
        finish(job, report, functools.partial(distributed.distributed_ann, job, master=master, spark=spark))
    return report


def index_vectors(out: str | os.PathLike, model_path: str | os.PathLike, paths: Sequence[str],
                  vectors: np.ndarray, kind: str = "auto", memory_budget: float = 8e9,
                  images_root: str | None = None, batch: int = 50_000) -> IndexReport:
    """Build an index from vectors computed elsewhere (``[N, D]``, one per path, normalised here),
    recorded with the model that will embed queries. Paths already in the index are replaced.
    Raises :class:`IndexError_` when the shape does not fit the model, ``EmbeddingsError`` for
    non-finite or zero vectors."""
    with index_job(out, model_path, kind, memory_budget) as job:
        dim = job.dim
        check_vectors(vectors)  # finite, no zero rows
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) != len(paths):
            raise IndexError_(f"expected {len(paths)} vectors of dimension {dim}, got shape {vectors.shape}")
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        job.catalog.set_root(os.path.abspath(images_root) if images_root else "", move=False)
        paths = [p if is_uri(p) else os.path.abspath(p) for p in paths]
        for s in range(0, len(paths), batch):
            job.catalog.write_batch([IndexedFile(p, 0, 0, v) for p, v in zip(paths[s:s + batch],
                                                                             vectors[s:s + batch])], [])
        report = IndexReport(found=len(paths), added=len(paths))
        finish(job, report)
    return report


def ensure_text_encoder(out: Path, job: IndexJob) -> None:
    """The model's ONNX text encoder inside the index (``out/text_encoder``), so that queries are
    answered without torch: a copy of the export cached per model hash under the cache root
    (:func:`~dualsearch.encode.onnx_encoders.text_export_dir`), which is exported and checked
    against torch within 1e-3 only the first time (loading the model; an unwritable cache root:
    straight into the index). A model that does not export is searched through torch."""
    from ..encode.cache import default_cache_dir
    from ..encode.onnx_encoders import (
        export_verified_text_encoder,
        install_text_encoder,
        text_export_dir,
        verified_text_export,
    )

    folder = out / TEXT_ENCODER_DIR
    try:
        if json.loads((folder / "export.json").read_text()).get("model_hash") == job.model_hash:
            return
    except (OSError, ValueError):
        pass
    cached = text_export_dir(default_cache_dir(), job.model_hash)
    try:
        if not verified_text_export(cached, job.model_hash) and \
                not export_verified_text_encoder(job.model, cached, job.model_hash):
            return
    except StorageError as e:
        log.warning("%s; exporting the text encoder into the index only", e)
        export_verified_text_encoder(job.model, folder, job.model_hash)
        return
    install_text_encoder(cached, folder)


def finish(job: IndexJob, report: IndexReport, builder: Callable[..., "ann.BuiltIndex | None"] | None = None
           ) -> None:
    """The epilogue: skips and timing into ``report``, the ONNX text encoder, and the ANN index
    and manifest (re)built when the catalog changed since they were last built. ``builder(n,
    kind, bank)``: builds and writes the ANN index of kind ``kind`` into ``job.out`` another way
    (the Spark path's distributed build, whose tasks also compute the QB-Norm offsets against
    ``bank()``, :class:`.qbnorm.Bank` or None), or returns None to leave it to :func:`ann.build_stream`."""
    report.skipped = [(s.path, s.reason) for s in job.catalog.skipped()]
    report.seconds = time.perf_counter() - job.t0
    out, catalog, dim = job.out, job.catalog, job.dim
    ensure_text_encoder(out, job)
    fill_metadata(catalog)  # rows embedded now, or upgraded from schema 1: no re-embedding
    try:
        manifest = read_manifest(out) if (out / MANIFEST_FILE).is_file() else None
    except IndexError_ as e:  # the catalog is the source of truth: a damaged manifest is rebuilt
        log.warning("%s; rebuilding it from the catalog", e)
        manifest = None
    stale = (manifest is None or manifest.get("generation") != catalog.generation
             or not (out / ANN_FILE).is_file() or (job.kind != "auto" and manifest["ann"]["kind"] != job.kind))
    if not stale:
        report.kind, report.count = manifest["ann"]["kind"], manifest["count"]
        moved = manifest["model"]["path"] != job.model_path  # same content hash, moved or copied: follow it
        rooted = manifest.get("images_root") != catalog.get_meta("images_root")  # a photo folder moved
        if moved or rooted or "calibration" not in manifest:  # or an index from before the weak-match floor
            index = ann.read(out / ANN_FILE, manifest["ann"].get("params"))
            manifest = {**manifest, "model": {"path": job.model_path, "hash": job.model_hash},
                        "images_root": catalog.get_meta("images_root"), **_calibration(job, index)}
            write_manifest(out, manifest)
        if not qbnorm.healthy(out, manifest):  # an index from before the correction, or damaged statistics
            write_manifest(out, {**manifest, **_hubness(job)})
        return
    n = catalog.count()
    kind = ann.choose_kind(n, dim, job.memory_budget) if job.kind == "auto" else job.kind
    built = (builder(n, kind, functools.partial(_embedded_bank, job)) if builder is not None else None) \
        or one_node_ann(job, n, kind)
    write_manifest(out, {
        "format_version": MANIFEST_VERSION, "model": {"path": job.model_path, "hash": job.model_hash},
        "dim": dim, "metric": "inner_product", "count": n, "generation": catalog.generation,
        "images_root": catalog.get_meta("images_root"),
        "ann": {"kind": built.kind, "params": built.params, "tuned_recall_at_10": round(built.recall, 4)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_calibration(job, built.index),
        **_hubness(job, built.stats.get("qbnorm")),
    })
    report.kind, report.count = built.kind, n


def one_node_ann(job: IndexJob, n: int, kind: str) -> "ann.BuiltIndex":
    """The ANN index of the catalog's ``n`` vectors built on this machine into ``job.out``: IVF-PQ
    on disk (:func:`.ondisk.build_local`: inverted lists and refine codes memory-mapped at search),
    flat and HNSW in one file (:func:`ann.build_stream`, which also stands in for IVF-PQ below
    2,000 vectors)."""
    from . import distributed, ondisk

    vectors = lambda: job.catalog.iter_vectors(job.dim)  # noqa: E731
    if kind == "ivfpq" and n >= max(2000, ondisk.MIN_VECTORS):
        return ondisk.build_local(vectors, n, job.dim, job.out, pq_bytes=distributed.pq_bytes_for(job.dim))
    built = ann.build_stream(vectors, n, job.dim, job.kind, job.memory_budget)
    ann.write(built.index, job.out / ANN_FILE)
    for stale in job.out.glob(f"{ANN_FILE}.*.ivfdata"):  # an on-disk index's lists, replaced (a server
        stale.unlink()  # still mapping them keeps them until it swaps)
    return built


def _calibration(job: IndexJob, index) -> dict:
    """The manifest's ``calibration`` (weak-match floor, :func:`.photos.calibrate`) and
    ``examples`` (queries for a landing page: the model's own, else the unrelated-query bank's
    best matches on this index)."""
    entry = calibrate(job.out, job.catalog, job.dim, job.query_encoder, index.search)
    if entry is None:
        return {"calibration": None, "examples": []}
    examples = read_model_config(job.model_path).get("example_queries") or entry.pop("best_bank_queries")
    entry.pop("best_bank_queries", None)
    return {"calibration": entry, "examples": list(examples)[:8]}


def _hubness(job: IndexJob, known: "qbnorm.KnownOffsets | None" = None) -> dict:
    """The manifest's ``qbnorm`` entry (:func:`.qbnorm.update`: per-image offsets against the
    model's query bank; ``known``: the ones the distributed build's tasks computed), None when
    the model has no bank or the index is empty."""
    bank = qbnorm.bank_for(job.model_path)
    if bank is None or not job.catalog.count():
        for stale in (qbnorm.STATS_FILE, qbnorm.BANK_FILE):
            (job.out / stale).unlink(missing_ok=True)
        return {"qbnorm": None}
    return {"qbnorm": qbnorm.update(job.out, job.catalog, job.dim, bank[0], bank[1], job.query_encoder, known)}


def _embedded_bank(job: IndexJob) -> "qbnorm.Bank | None":
    """The model's query bank embedded as queries are (:func:`.qbnorm.embedded_bank`), for the
    distributed build's tasks; None when the model has none (a warning for a damaged one)."""
    bank = qbnorm.bank_for(job.model_path)
    return qbnorm.embedded_bank(job.out, bank[0], bank[1], job.query_encoder) if bank is not None else None


def relocate(out: str | os.PathLike, old: str, new: str) -> int:
    """The photos of index ``out`` moved from folder ``old`` to ``new`` (no file is read, no
    vector recomputed): catalog paths and the manifest's ``images_root`` follow. -> rows moved.
    Raises ``CatalogError`` / :class:`IndexError_` for a folder that is not an index, a ``new``
    that is not a folder, or an ``old`` with no indexed photo below it."""
    out, old, new = Path(out), os.path.abspath(old), os.path.abspath(new)
    manifest = read_manifest(out)
    if manifest is None:
        raise IndexError_(f"{out}: not a dualsearch index (no {MANIFEST_FILE})")
    if not os.path.isdir(new):
        raise IndexError_(f"{new}: no such folder (move the photos there first; nothing was changed)")
    catalog = Catalog(out)
    try:
        with catalog.transaction():
            moved = catalog.relocate(old, new)
            if not moved:  # rolled back with the transaction: nothing was changed
                raise IndexError_(f"{old}: no indexed photo is below it (the index's root is "
                                  f"{catalog.root or 'none'}); nothing was changed")
        write_manifest(out, {**manifest, "images_root": catalog.get_meta("images_root")})
    finally:
        catalog.close()
    return moved
