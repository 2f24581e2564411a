"""The local runner: embed a plan's files in this process (DataLoader workers decode, the main
process runs the encoder backend) and commit them to the catalog in batches."""
from __future__ import annotations

import logging
import time
from typing import Sequence

from tqdm import tqdm

from ..encode.backends import image_forward
from ..encode.cache import default_cache_dir
from ..encode.loader import image_loader
from ..encode.modules import NormalizedImageEncoder
from .catalog import IndexedFile, SkippedFile
from .plan import Entry

log = logging.getLogger(__name__)


def embed_files(job, todo: Sequence[Entry], report, batch_size: int = 64, num_workers: int | None = None,
                commit_every: int = 256, progress: bool = True, max_pixels: int | None = None,
                engine: str = "auto") -> None:
    """Embed ``todo`` with ``job.model``'s image encoder into ``job.catalog``, committing every
    ``commit_every`` files (a killed run keeps every committed batch). Fills ``report.added``,
    ``report.embed_seconds`` and ``report.engine``."""
    if not todo:
        return
    model = job.model
    forward, used = image_forward(NormalizedImageEncoder(model), f"encoder-{job.model_hash}",
                                  model.image_tower.image_size, default_cache_dir(), engine, str(model.device))
    loader = image_loader([t.path for t in todo], model.image_tower, batch_size, num_workers, max_pixels)
    good, bad = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress) as bar:
        for idx, pixels, failed in loader:
            if pixels is not None:
                good += [IndexedFile(*todo[i], v) for i, v in zip(idx, forward(pixels))]
            bad += [SkippedFile(*todo[i], reason) for i, reason in failed]
            if len(good) + len(bad) >= commit_every:
                job.catalog.write_batch(good, bad)
                report.added += len(good)
                good, bad = [], []
            bar.update(len(idx) + len(failed))
    job.catalog.write_batch(good, bad)
    report.added += len(good)
    report.embed_seconds = time.perf_counter() - t0
    report.engine = used
    log.info("embedded %d images in %.1f s (%s)", len(todo), report.embed_seconds, used)
