"""The local runner: embed a plan's files in this process and commit them to the catalog in batches.

On CPU with ONNX Runtime (``engine`` auto or onnx) the image encoder is the model's verified ONNX
export (:func:`dualsearch.encode.backends.verified_onnx`, cached per model hash); once it exists,
indexing imports neither torch nor transformers: threads decode and embed in lanes
(:mod:`dualsearch.encode.pipeline`). ``engine="torch"``, a GPU, or a model whose export failed
its check use torch, with DataLoader workers decoding.
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from typing import Iterator, Sequence

from ..data.images import ImagePreprocessor
from ..encode.cache import default_cache_dir
from ..encode.pipeline import MAX_ONNX_BATCH, embed_images, plan_threads
from ..encode.runtime import onnx_file, ort_session, read_record, wants_onnx
from ..errors import ConfigError, Interrupted
from ..logs import progress
from .catalog import IndexedFile, SkippedFile
from .plan import Entry

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")


class _Batch:
    """Embedded and skipped files not committed yet, and how many this run committed."""

    def __init__(self, job, report):
        self.job, self.report = job, report
        self.good: list[IndexedFile] = []
        self.bad: list[SkippedFile] = []
        self.committed = 0

    def __len__(self) -> int:
        return len(self.good) + len(self.bad)

    def commit(self) -> None:
        """One catalog transaction: all of the batch or (interrupted, failed) none of it."""
        self.job.catalog.write_batch(self.good, self.bad)
        self.report.added += len(self.good)
        self.committed += len(self)
        self.good, self.bad = [], []


def verified_image_encoder(job) -> tuple[str, dict] | None:
    """-> (ONNX file, its record) of ``job``'s image encoder: the cached verified export when
    there is one (no torch), else exported and checked now (loads the model); None when the
    export fails its check (torch embeds then)."""
    path = onnx_file(default_cache_dir(), f"encoder-{job.model_hash}")
    record = read_record(path)
    if record is None or "image" not in record:
        from ..encode.backends import verified_onnx  # torch: only for the first run of a model
        from ..encode.modules import NormalizedImageEncoder

        model = job.model
        if verified_onnx(NormalizedImageEncoder(model), path.stem, model.image_tower.image_size,
                         default_cache_dir()) is None:
            return None
        record = read_record(path)
    return (str(path), record) if record and "image" in record else None


def _onnx_batches(job, todo: Sequence[Entry], batch_size: int, num_workers: int | None,
                  max_pixels: int | None, precision: str) -> tuple[Iterator, str] | None:
    """Batches ``(positions, vectors, [(position, reason)])`` from ONNX Runtime, and the engine's
    name; None when this model has no verified export."""
    verified = verified_image_encoder(job)
    if verified is None:
        return None
    path, record = verified
    prep = ImagePreprocessor(**{**record["image"], "mean": tuple(record["image"]["mean"]),
                                "std": tuple(record["image"]["std"])})
    paths = [t.path for t in todo]
    name = "onnx"
    if precision == "int8":
        from ..encode.quantize import int8_image_encoder

        path = int8_image_encoder(path, paths, prep, max_pixels)
        name = "onnx int8"
    lanes, intra = plan_threads(num_workers)
    session = ort_session(path, intra, spin=lanes == 0)
    return embed_images(session, paths, prep, min(batch_size, MAX_ONNX_BATCH), lanes, max_pixels), name


def _torch_batches(job, todo: Sequence[Entry], batch_size: int, num_workers: int | None,
                   max_pixels: int | None, engine: str) -> tuple[Iterator, str]:
    """The torch path: DataLoader workers decode, :func:`image_forward` embeds."""
    from ..encode.backends import image_forward
    from ..encode.loader import image_loader
    from ..encode.modules import NormalizedImageEncoder

    model = job.model
    forward, used = image_forward(NormalizedImageEncoder(model), f"encoder-{job.model_hash}",
                                  model.image_tower.image_size, default_cache_dir(), engine, str(model.device))
    loader = image_loader([t.path for t in todo], model.image_tower, batch_size, num_workers, max_pixels)
    return ((idx, forward(px) if px is not None else None, bad) for idx, px, bad in loader), used


def embed_files(job, todo: Sequence[Entry], report, batch_size: int = 64, num_workers: int | None = None,
                commit_every: int = 256, progress: bool = True, max_pixels: int | None = None,
                engine: str = "auto", precision: str = "fp32") -> None:
    """Embed ``todo`` with ``job``'s image encoder into ``job.catalog``, committing every
    ``commit_every`` files (a killed run keeps every committed batch). ``num_workers``: decoding
    lanes (ONNX) or worker processes (torch); 0 decodes in this thread. ``precision``: "int8"
    embeds with a statically quantised copy of the ONNX encoder (:mod:`dualsearch.encode.quantize`).
    Fills ``report.added``, ``report.embed_seconds`` and ``report.engine``. Progress: one bar on a
    terminal, else one line (:func:`dualsearch.logs.progress`). Ctrl-C commits the files already
    embedded and raises :class:`~dualsearch.errors.Interrupted` saying how many are in the catalog.
    Raises :class:`~dualsearch.errors.ConfigError` for an unknown engine or precision."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not todo:
        return
    onnx = wants_onnx(engine, job.device)
    made = _onnx_batches(job, todo, batch_size, num_workers, max_pixels, precision) if onnx else None
    if made is None and precision == "int8":
        raise ConfigError("--precision int8 needs the ONNX engine on CPU (a model whose ONNX export passes its check)")
    batches, used = made or _torch_batches(job, todo, batch_size, num_workers, max_pixels,
                                           "torch" if onnx else engine)  # a failed export is not retried
    batch = _Batch(job, report)
    t0 = time.perf_counter()
    try:
        with _progress(len(todo), progress) as bar, closing(batches):
            for idx, vecs, failed in batches:
                batch.good += [IndexedFile(*todo[i], v) for i, v in zip(idx, vecs)] if vecs is not None else []
                batch.bad += [SkippedFile(*todo[i], reason) for i, reason in failed]
                if len(batch) >= commit_every:
                    batch.commit()
                bar.update(len(idx) + len(failed))
            batch.commit()
    except KeyboardInterrupt as e:
        _keep_and_raise(batch, len(todo), e)
    report.embed_seconds = time.perf_counter() - t0
    report.engine = used
    log.debug("embedded %d images in %.1f s (%s)", len(todo), report.embed_seconds, used)


def _progress(total: int, enabled: bool):
    return progress(total, "indexing", "img", "images", enabled=enabled)


def _keep_and_raise(batch: _Batch, total: int, e: KeyboardInterrupt) -> None:
    """Ctrl-C while embedding: commit what was embedded (one transaction; a second Ctrl-C during
    it leaves the catalog as it was), then raise :class:`Interrupted` with the count kept."""
    try:
        if len(batch):
            batch.commit()
    except KeyboardInterrupt:
        pass
    if isinstance(e, Interrupted):
        raise e
    raise Interrupted(f"indexing stopped: {batch.committed:,} of {total:,} images committed to the catalog; "
                      f"run the same command again to resume") from None
