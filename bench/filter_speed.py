"""Filtered ANN search speed and recall: `ann.search(..., allowed=...)` on clustered vectors.

    python bench/filter_speed.py [--n 1000000] [--dim 256] [--selectivity 0.5,0.05,0.001]

For HNSW and IVF-PQ indexes built with `ann.build` (tuned as `dualsearch index` tunes them), and
each selectivity (a random sorted subset of the ids): single-query QPS and recall@10 against exact
brute-force filtered search over the same in-memory vectors (whose QPS is the baseline), beside
unfiltered search in the same run, for both routes `ann.search` can take: exact scoring of the
allowed vectors read back from the index ("exact route"), and the index with a FAISS id selector
and efSearch/nprobe widened ("selector route"); then the route it takes at that size. "short rows":
queries answered with fewer than min(10, allowed) results (the guarantee is 0). One more row per
index compares the two FAISS selectors (`IDSelectorBitmap`, `IDSelectorBatch`) at 5 %. FAISS
searches single-threaded here (one query at a time, as a server answers it), so that figures from
a shared machine stay comparable; exact routes are timed on the first 20 queries, and no route
for more than 30 s (QPS and recall then over the queries answered).
A smoke run: `--n 50000 --queries 100`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, table  # noqa: E402
from dualsearch.index import ann  # noqa: E402


def clustered(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors from a mixture of ``max(100, n / 1000)`` Gaussians (bench/search_speed.py's
    clustered set), and fresh queries from the same mixture."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(100, n // 1000), dim)).astype(np.float32)

    def sample(m: int) -> np.ndarray:
        x = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):
            part = centers[rng.integers(0, len(centers), min(100_000, m - s))]
            part = part + rng.normal(scale=0.7, size=part.shape).astype(np.float32)
            x[s:s + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
        return x

    return sample(n), sample(n_queries)


def timed(fn, queries: np.ndarray, budget_s: float = 30.0) -> tuple[float, np.ndarray]:
    """Single-query QPS of ``fn(q [1, D]) -> (scores, ids)`` and the ids it returned ``[n', 10]``
    for the first ``n'`` queries answered within ``budget_s`` (at least one)."""
    got = []
    t0 = time.perf_counter()
    for q in queries:
        got.append(fn(q[None])[1][0])
        if time.perf_counter() - t0 > budget_s:
            break
    return len(got) / (time.perf_counter() - t0), np.array(got)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    truth = truth[:len(got)]
    hits = sum(len(set(g[g >= 0]) & set(t[t >= 0])) for g, t in zip(got, truth))
    return hits / max(1, int((truth >= 0).sum()))


def filtered_row(index, q: np.ndarray, x: np.ndarray, allowed: np.ndarray, slow_queries: int) -> list:
    """Brute force (in-memory vectors; the baseline), both routes of `ann.search`, and the one it
    takes. Exact routes are timed on the first ``slow_queries`` queries only."""
    getter = lambda i: x[i]  # noqa: E731  (ids are positions here)
    _, truth = ann.exact_filtered(index, q, 10, allowed, getter)
    few = q[:slow_queries]
    base_qps, _ = timed(lambda v: ann.exact_filtered(index, v, 10, allowed, getter), few)
    exact_qps, exact_got = timed(lambda v: ann.exact_filtered(index, v, 10, allowed), few)
    sel_qps, sel_got = timed(lambda v: ann._selected(index, v, 10, allowed, None), q)
    kind = ann._kind_of(index)
    exact = ann.exact_route(kind, len(allowed), index.ntotal)
    got = exact_got if exact else sel_got
    short = int(((got >= 0).sum(axis=1) < min(10, len(allowed))).sum())
    return [round(base_qps), round(exact_qps), round(recall(exact_got, truth), 3), round(sel_qps),
            round(recall(sel_got, truth), 3), "exact" if exact else "selector",
            round(exact_qps if exact else sel_qps), short]


def bench_kind(kind: str, x: np.ndarray, q: np.ndarray, fractions: list[float], seed: int,
               build_threads: int = 0, slow_queries: int = 20) -> list[list]:
    n = len(x)
    threads = faiss.omp_get_max_threads()
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(build_threads or threads)
    built = ann.build(x, ids, kind)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    index = built.index
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    qps, got = timed(lambda v: ann.search(index, v, 10), q)
    rows = [[kind, n, round(build_s), str(built.params), "100 %", "-", "-", "-", round(qps),
             round(recall(got, truth), 3), "unfiltered", round(qps), 0]]
    print(rows[-1], flush=True)
    rng = np.random.default_rng(seed)
    for frac in fractions:
        allowed = np.sort(rng.choice(n, size=max(1, int(round(n * frac))), replace=False)).astype(np.int64)
        rows.append([kind, n, "", "", f"{frac:.1%}", *filtered_row(index, q, x, allowed, slow_queries)])
        print(rows[-1], flush=True)
    rows.append(selector_row(kind, index, q, x, rng))
    faiss.omp_set_num_threads(threads)
    return rows


def selector_row(kind: str, index, q: np.ndarray, x: np.ndarray, rng) -> list:
    """Bitmap against hash-set selector at 5 %, through the selector route only."""
    n = len(x)
    allowed = np.sort(rng.choice(n, size=n // 20, replace=False)).astype(np.int64)
    out = []
    for name, sparsity in (("bitmap", ann.BITMAP_MAX_SPARSITY), ("batch", -1)):
        saved, ann.BITMAP_MAX_SPARSITY = ann.BITMAP_MAX_SPARSITY, sparsity
        try:
            t0 = time.perf_counter()
            for _ in range(20):
                ann._selector(allowed)
            make_ms = (time.perf_counter() - t0) / 20 * 1000
            qps, _ = timed(lambda v: ann._selected(index, v, 10, allowed, None), q)
        finally:
            ann.BITMAP_MAX_SPARSITY = saved
        out.append(f"{name} {round(qps)} QPS ({make_ms:.1f} ms to make)")
    return [kind, n, "", "", "5.0 %", "-", "-", "-", "", "", " vs ".join(out), "", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200, help="fresh queries, answered one at a time")
    ap.add_argument("--selectivity", default="0.5,0.05,0.001", help="fractions of the ids allowed")
    ap.add_argument("--kinds", default="hnsw,ivfpq")
    ap.add_argument("--build-threads", type=int, default=0, help="FAISS threads to build with (0: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    x, q = clustered(args.n, args.dim, args.queries)
    rows = []
    for kind in args.kinds.split(","):
        rows += bench_kind(kind, x, q, [float(s) for s in args.selectivity.split(",")], 1, args.build_threads)
    print(f"\nbench/filter_speed.py, n={args.n:,}, d={args.dim}, {args.queries} fresh queries one at a time, "
          f"k=10, FAISS {faiss.__version__} single-threaded search; {machine()}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(table(["index", "n", "build s", "params", "allowed", "brute-force QPS", "exact route QPS",
                 "recall", "selector route QPS", "recall", "route taken", "QPS", "short rows"], rows))


if __name__ == "__main__":
    main()
