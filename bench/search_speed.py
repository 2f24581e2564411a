"""ANN search speed and recall: exact search against each FAISS kind, on 100k and 1M vectors (d=256).

    python bench/search_speed.py [--sizes 100000,1000000] [--data uniform,clustered]

For each size and data set: build time, index memory (serialized bytes), queries per second
(single queries and one batch of 1,000), p50/p99 single-query latency, and recall@10 against exact
search with fresh queries. Uniform random unit vectors have no neighbourhood structure (the worst
case for any ANN index); the clustered set (a mixture of 1,000 Gaussians) is closer to real
embeddings. Ends with the end-to-end latency of one text query (encode + search) on a 100k index.
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

DIM = 256


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(kind: str, n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return unit(rng.normal(size=(n, DIM))), unit(rng.normal(size=(n_queries, DIM)))
    centers = rng.normal(size=(1000, DIM))

    def sample(m):
        return unit(centers[rng.integers(0, 1000, m)] + rng.normal(scale=0.7, size=(m, DIM)))

    return sample(n), sample(n_queries)


def measure(index, queries: np.ndarray, truth: np.ndarray, single: int = 300) -> dict:
    lat = []
    for q in queries[:single]:
        t0 = time.perf_counter()
        index.search(q[None], 10)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, got = index.search(queries, 10)
    batch_s = time.perf_counter() - t0
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
    lat_ms = np.array(lat) * 1000
    return {"qps1": 1000 / np.mean(lat_ms), "qpsb": len(queries) / batch_s, "p50": np.percentile(lat_ms, 50),
            "p99": np.percentile(lat_ms, 99), "recall": recall}


def bench_size(data: str, n: int, kinds: list[str]) -> list[list]:
    x, q = make(data, n, 1000)
    ids = np.arange(n, dtype=np.int64)
    rows, exact_qps = [], None
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    _, truth = exact.search(q, 10)
    chosen = ann.choose_kind(n, DIM)
    for kind in kinds:
        t0 = time.perf_counter()
        built = ann.build(x, ids, kind)
        build_s = time.perf_counter() - t0
        mem = faiss.serialize_index(built.index).nbytes
        m = measure(built.index, q, truth)
        if kind == "flat":
            exact_qps = m["qps1"]
        rows.append([data, n, kind + (" (auto)" if kind == chosen else ""), round(build_s, 1),
                     f"{mem / 2**20:.0f} MiB", round(mem / n, 1), str(built.params or "-"), round(m["qps1"]),
                     round(m["qpsb"]), round(m["p50"], 3), round(m["p99"], 3), round(m["recall"], 3),
                     f"{m['qps1'] / exact_qps:.1f}x" if exact_qps else "-"])
        print(rows[-1], flush=True)
        del built
    return rows


def end_to_end(n: int = 100_000) -> list:
    from dualsearch.config import ModelConfig
    from dualsearch.model.dual_encoder import DualEncoder

    x, _ = make("clustered", n, 1)
    built = ann.build(x, np.arange(n), "auto")
    model = DualEncoder(ModelConfig()).eval()
    model.embed_texts(["warm up"])
    lat = []
    for text in ["a red circle", "two blue stars above a green square", "a dog on the beach"] * 10:
        t0 = time.perf_counter()
        v = model.embed_texts([text])
        built.index.search(v, 9)
        lat.append((time.perf_counter() - t0) * 1000)
    return [n, built.kind, round(float(np.percentile(lat, 50)), 1), round(float(np.percentile(lat, 99)), 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--data", default="uniform,clustered")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end text query timing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for data in args.data.split(","):
        for n in [int(s) for s in args.sizes.split(",")]:
            rows += bench_size(data, n, args.kinds.split(","))
    e2e = None if args.skip_e2e else end_to_end()
    print(f"\nbench/search_speed.py, d={DIM}, 1,000 fresh queries, k=10; {machine()}")
    print(table(["data", "n", "index", "build s", "memory", "bytes/vec", "params", "QPS single", "QPS batch",
                 "p50 ms", "p99 ms", "recall@10", "vs exact"], rows))
    if e2e:
        print("\nend-to-end text query (MiniLM encode + search, default towers):")
        print(table(["n", "index", "p50 ms", "p99 ms"], [e2e]))


if __name__ == "__main__":
    main()
