"""Concurrent queries: micro-batched text encoding and per-thread catalog connections give the
same answers as one query at a time."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dualsearch.encode.batching import MicroBatcher
from dualsearch.index.build import build_index
from dualsearch.search import Searcher


def test_micro_batcher_batches_concurrent_calls_and_returns_each_its_row():
    batches, gate = [], threading.Event()

    def fn(items):
        gate.wait(5)  # hold the first batch so that the others queue up behind it
        batches.append(len(items))
        return np.array([[x, x * 2] for x in items], dtype=np.float32)

    b = MicroBatcher(fn, max_batch=8)
    with ThreadPoolExecutor(17) as pool:
        futures = [pool.submit(b, i) for i in range(17)]
        threading.Timer(0.3, gate.set).start()
        rows = [f.result(10) for f in futures]
    assert [r.tolist() for r in rows] == [[i, 2 * i] for i in range(17)]
    assert sum(batches) == 17 and max(batches) > 1 and max(batches) <= 8
    b.close()


def test_micro_batcher_hands_an_error_to_every_caller_of_its_batch():
    def fn(items):
        raise ValueError("tokenizer broke")

    b = MicroBatcher(fn)
    with pytest.raises(ValueError, match="tokenizer broke"):
        b("x")
    b.close()


def test_concurrent_searches_equal_sequential_ones(tmp_path, shapes_data, tiny_model):
    _, root = shapes_data
    out = tmp_path / "idx"
    build_index(root / "images", tiny_model, out, num_workers=0, progress=False)
    s = Searcher.open(out)
    try:
        queries = [f"{n} {c} {shape}" for n in ("one", "two", "three") for c in ("red", "blue", "green")
                   for shape in ("circles", "stars")]
        want = [[(r.id, round(r.score, 5)) for r in s.search(q, k=5)] for q in queries]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q: [(r.id, round(r.score, 5)) for r in s.search(q, k=5)], queries * 3))
        assert got == want * 3
        assert len(s._catalogs) > 1  # the worker threads read through their own connections
    finally:
        s.close()
