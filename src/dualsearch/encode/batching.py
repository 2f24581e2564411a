"""Micro-batching of concurrent encoder calls: many threads each asking for one text's vector are
served by one encoder call over all of them.

A server's worker threads each encode one query; run one at a time, a small transformer spends
most of its time on per-call overhead, and run at once, ONNX Runtime's intra-op thread pools
oversubscribe the cores. One encoder thread takes whatever requests are waiting, encodes them as
one batch and hands each caller its row: a lone request goes straight through (no waiting window,
so no added latency), and under load the batch grows by itself with the queue (the "natural" or
adaptive batching of inference servers such as Triton's dynamic batcher with zero delay).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np


class MicroBatcher:
    """``batcher(item) -> row`` of ``fn(items) -> [N, ...]``; safe to call from any thread.
    ``max_batch`` caps one call's batch. An exception in ``fn`` reaches every caller of that
    batch. The encoder thread is a daemon, started on first use and ended by :meth:`close`."""

    def __init__(self, fn: Callable[[Sequence], np.ndarray], max_batch: int = 32):
        self.fn = fn
        self.max_batch = max_batch
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def __call__(self, item) -> np.ndarray:
        fut: Future = Future()
        self.queue.put((item, fut))
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    self.thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
                    self.thread.start()
        return fut.result()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # close after this batch
                    break
                batch.append(nxt)
            try:
                out = self.fn([item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - handed to the callers, who raise it
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for i, (_, fut) in enumerate(batch):
                fut.set_result(out[i])

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
