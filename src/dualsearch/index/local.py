"""The local runner: embed a plan's files in this process (DataLoader workers decode, the main
process runs the encoder backend) and commit them to the catalog in batches."""
from __future__ import annotations

import logging
import time
from typing import Sequence

from ..encode.backends import image_forward
from ..encode.cache import default_cache_dir
from ..encode.loader import image_loader
from ..encode.modules import NormalizedImageEncoder
from ..errors import Interrupted
from ..logs import progress
from .catalog import IndexedFile, SkippedFile
from .plan import Entry

log = logging.getLogger(__name__)


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


def embed_files(job, todo: Sequence[Entry], report, batch_size: int = 64, num_workers: int | None = None,
                commit_every: int = 256, progress: bool = True, max_pixels: int | None = None,
                engine: str = "auto") -> None:
    """Embed ``todo`` with ``job.model``'s image encoder into ``job.catalog``, committing every
    ``commit_every`` files (a killed run keeps every committed batch). Fills ``report.added``,
    ``report.embed_seconds`` and ``report.engine``. Progress: one bar on a terminal, else one line
    (:func:`dualsearch.logs.progress`). Ctrl-C commits the files already embedded and raises
    :class:`~dualsearch.errors.Interrupted` saying how many are in the catalog."""
    if not todo:
        return
    model = job.model
    forward, used = image_forward(NormalizedImageEncoder(model), f"encoder-{job.model_hash}",
                                  model.image_tower.image_size, default_cache_dir(), engine, str(model.device))
    loader = image_loader([t.path for t in todo], model.image_tower, batch_size, num_workers, max_pixels)
    batch = _Batch(job, report)
    t0 = time.perf_counter()
    try:
        with _progress(len(todo), progress) as bar:
            for idx, pixels, failed in loader:
                good = [IndexedFile(*todo[i], v) for i, v in zip(idx, forward(pixels))] if pixels is not None else []
                batch.good += good
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
