"""Decode and embed images with ONNX Runtime alone (torch-free): the indexing pipeline's CPU path.

On a few cores the decoder and the encoder compete for the same cores, so the work is cut into
lanes: each lane is a thread that decodes one batch (Pillow, reduced-size JPEG decoding) and then
runs it through the shared ONNX Runtime session on its own thread(s). Pillow and ONNX Runtime
release the GIL, so two lanes on two cores keep both cores busy with no thread waiting on
another, and the next batch is decoded while the other lane encodes (the prefetch). The lanes
share one session (``InferenceSession.run`` is thread-safe), so the weights are held once.
Sized in ``bench/index_speed.py`` against the engine's and the decoder's own rates.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from ..data.images import ImageLoadError, ImagePreprocessor, load_image

# ONNX Runtime on CPU is no faster per image on larger batches, and its memory grows with the batch
# (EfficientNet-Lite0, 2 lanes: peak RSS 332 MiB at 8, 515 MiB at 16; bench/index_speed.py)
MAX_ONNX_BATCH = 8
MAX_LANES = 4


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, as a container's CPU set gives it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_threads(lanes: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """-> (lanes, ONNX Runtime intra-op threads per lane) for ``cores`` (this machine's where
    None). ``lanes``: None picks one per core up to :data:`MAX_LANES`; 0 decodes and encodes in
    the calling thread, with every core for the encoder."""
    cores = cores or cpu_count()
    if lanes is None:
        lanes = min(cores, MAX_LANES)
    return lanes, max(1, cores // max(1, lanes))


def decode(src, preprocess: ImagePreprocessor, max_pixels: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """One image -> (pixels ``[3,S,S]`` float32, None) or (None, the reason it is skipped)."""
    try:
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        return preprocess.array(load_image(src, target_size=preprocess.size, **kwargs)), None
    except ImageLoadError as e:
        return None, e.reason
    except Exception as e:  # a decoder bug on one file must not stop the run
        return None, f"cannot decode ({type(e).__name__}: {e})"


def embed_chunk(session, srcs: Sequence, start: int, preprocess: ImagePreprocessor,
                max_pixels: int | None = None) -> tuple[list[int], np.ndarray | None, list[tuple[int, str]]]:
    """Decode ``srcs`` (positions ``start``...) and embed the good ones in one ``session.run``.
    -> (positions embedded, vectors ``[B,D]`` float32 or None, ``[(position, reason)]`` skipped)."""
    decoded = [decode(s, preprocess, max_pixels) for s in srcs]
    ok = [i for i, (px, _) in enumerate(decoded) if px is not None]
    bad = [(start + i, reason) for i, (px, reason) in enumerate(decoded) if px is None]
    if not ok:
        return [], None, bad
    vecs = session.run(None, {"pixels": np.stack([decoded[i][0] for i in ok])})[0]
    return [start + i for i in ok], np.asarray(vecs, dtype=np.float32), bad


def embed_images(session, srcs: Sequence, preprocess: ImagePreprocessor, batch_size: int = MAX_ONNX_BATCH,
                 lanes: int = 1, max_pixels: int | None = None) -> Iterator[tuple]:
    """Batches of :func:`embed_chunk` over ``srcs`` (paths or :class:`~dualsearch.data.records.ImageRef`),
    in order, run on ``lanes`` threads (0: in the calling thread) with one batch queued beyond
    those running. Closing the generator (or Ctrl-C in the caller) cancels the queued batches and
    waits for the running ones (each at most ``batch_size`` images)."""
    starts = range(0, len(srcs), batch_size)
    if lanes <= 0:
        for s in starts:
            yield embed_chunk(session, srcs[s:s + batch_size], s, preprocess, max_pixels)
        return
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="dualsearch-embed")
    pending: list[Future] = []
    try:
        for s in starts:
            pending.append(pool.submit(embed_chunk, session, srcs[s:s + batch_size], s, preprocess, max_pixels))
            if len(pending) > lanes:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
