"""Helpers shared by the benchmarks: generated data sets (made once, reused) and table printing."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from dualsearch.data.readers import read_dataset
from dualsearch.data.shapes import generate_shapes

BENCH_DIR = Path(os.environ.get("DUALSEARCH_BENCH_DIR", "bench-out"))


def shapes(name: str, images: int, seed: int, size: str = "224"):
    """A generated shapes set under bench-out/, reused when already there."""
    root = BENCH_DIR / f"{name}-{images}-{seed}-{size}"
    captions = root / "captions.json"
    if not captions.is_file():
        generate_shapes(root, images, seed=seed, size=size)
    return read_dataset(captions, root)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def session_rate(session, size: int, batch: int, seconds: float = 4.0) -> float:
    """Images per second of an ONNX Runtime image-encoder ``session`` on random ``[batch, 3, size,
    size]`` input: one warm-up run, then runs for at least ``seconds`` (and at least 3)."""
    import time

    import numpy as np

    x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    session.run(None, {"pixels": x})
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        session.run(None, {"pixels": x})
        n += 1
    return n * batch / (time.perf_counter() - t0)
