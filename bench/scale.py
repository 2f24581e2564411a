"""Large IVF-PQ indexes built shard by shard, as the Spark path builds them: time, memory, recall.

    python bench/scale.py [--sizes 1000000,10000000] [--shard-rows 250000] [--baseline-max 1000000]

For each size, synthetic clustered unit vectors (d=256, a mixture of 1,000 Gaussians, as in
bench/search_speed.py) are written once as Parquet shards in the layout Spark executors write
(bench-out/scale-N/part-*.parquet). Each build then runs in a fresh process so that its peak RSS is
its own:
  - shard by shard: ``ann.build_stream`` reading one shard at a time (train on a sample, add shard
    by shard, tune against exact neighbours computed shard by shard);
  - baseline (sizes up to --baseline-max): every vector loaded into memory, then ``ann.build``.
Recall@10 is measured with 1,000 fresh queries against exact search (computed shard by shard), at
the parameters the build tuned. Bytes per vector: the serialized index / N, and the build's peak
RSS / N. At 1M it also times ingesting the shards into a catalog (the Spark path's step between
the shards and the build), its bytes per vector on disk, and one pass over its vectors (the
product's build reads the catalog three times).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, table  # noqa: E402
from dualsearch.index.spark import peak_rss_mb  # noqa: E402

DIM = 256
CENTERS = 1000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def centers() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(CENTERS, DIM))


def sample(rng, m: int, c: np.ndarray) -> np.ndarray:
    return unit(c[rng.integers(0, CENTERS, m)] + rng.normal(scale=0.7, size=(m, DIM)))


def write_shards(n: int, shard_rows: int) -> Path:
    """Parquet shards with the Spark path's columns (made once, reused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = BENCH_DIR / f"scale-{n}"
    done = root / "_done"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    c = centers()
    t0 = time.perf_counter()
    for s, start in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - start)
        vecs = sample(np.random.default_rng(1000 + s), m, c)
        table = pa.table({
            "path": pa.array([f"/images/{i:09d}.jpg" for i in range(start, start + m)]),
            "size": pa.array(np.full(m, 50_000, np.int64)), "mtime_ns": pa.array(np.zeros(m, np.int64)),
            "status": pa.array(["indexed"] * m), "reason": pa.array([None] * m, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), DIM),
        })
        pq.write_table(table, root / f"part-{s:05d}.parquet")
    done.write_text(str(n))
    print(f"  wrote {n:,} vectors as shards of {shard_rows:,} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def shard_batches(root: Path):
    import pyarrow.parquet as pq

    files = sorted(root.glob("part-*.parquet"))

    def batches():
        start = 0
        for f in files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["embedding"]):
                v = b.column(0).flatten().to_numpy().reshape(-1, DIM)
                yield np.arange(start, start + len(v), dtype=np.int64), v
                start += len(v)

    return batches


def child_build(root: str, n: int, mode: str, budget: float, out: mp.Queue) -> None:
    """One build in its own process: -> timings, peak RSS, index bytes, recall@10."""
    import faiss

    from dualsearch.index import ann

    root = Path(root)
    base = peak_rss_mb()
    batches = shard_batches(root)
    t0 = time.perf_counter()
    if mode == "baseline":
        ids, vecs = zip(*batches())
        built = ann.build(np.concatenate(vecs), np.concatenate(ids), "ivfpq", budget)
    else:
        built = ann.build_stream(batches, n, DIM, "ivfpq", budget)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    index_bytes = len(faiss.serialize_index(built.index))
    queries = sample(np.random.default_rng(7), 1000, centers())
    _, truth = ann.exact_knn(queries, batches, 10)
    ann.set_params(built.index, built.params)
    t1 = time.perf_counter()
    recall = ann.recall_at(built.index, queries, truth)
    qps = len(queries) / (time.perf_counter() - t1)
    out.put({"mode": mode, "seconds": seconds, "parts": built.seconds, "peak_mb": peak, "base_mb": base,
             "index_bytes": index_bytes, "recall": recall, "qps": qps, "params": built.params,
             "factory": faiss.downcast_index(ann._inner(built.index)).__class__.__name__})


def child_ingest(root: str, n: int, out: mp.Queue) -> None:
    """Shards -> a catalog, as the Spark path ingests them (one transaction per shard)."""
    import tempfile

    from dualsearch.index import spark as sp
    from dualsearch.index.catalog import Catalog
    from dualsearch.index.plan import SHARD_PREFIX, Part

    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as d:
        cat = Catalog(d, create=True)
        t0 = time.perf_counter()
        for f in sorted(Path(root).glob("part-*.parquet")):
            sp.ingest(cat, Part(f.stem[len(SHARD_PREFIX):], "files", ()), root, DIM)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        read = sum(len(ids) for ids, _ in cat.iter_vectors(DIM))  # one pass of the index build
        pass_s = time.perf_counter() - t1
        cat.close()
        size = sum(p.stat().st_size for p in Path(d).iterdir())
    out.put({"seconds": seconds, "bytes": size, "peak_mb": peak_rss_mb(), "pass_s": pass_s, "read": read})


def run(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--baseline-max", type=int, default=1_000_000)
    ap.add_argument("--ingest-max", type=int, default=1_000_000)
    ap.add_argument("--memory-budget", type=float, default=8.0,
                    help="GB, as `index --memory-budget`: it picks the refine codes (fp16 when they fit, else SQ8)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(f"# bench/scale.py on {machine()}")
    rows, results = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = write_shards(n, args.shard_rows)
        shard_bytes = sum(f.stat().st_size for f in root.glob("part-*.parquet"))
        modes = ["shards"] + (["baseline"] if n <= args.baseline_max else [])
        for mode in modes:
            r = run(child_build, str(root), n, mode, args.memory_budget * 1e9)
            r["n"] = n
            results.append(r)
            print(f"  {n:,} {mode}: {json.dumps(r)}", flush=True)
            rows.append([f"{n:,}", "shard by shard" if mode == "shards" else "all in memory (baseline)",
                         round(r["seconds"]), round(r["parts"].get("train", 0)), round(r["parts"].get("add", 0)),
                         round(r["parts"].get("tune", 0)), round(r["peak_mb"]), round(r["index_bytes"] / n, 1),
                         round((r["peak_mb"] - r["base_mb"]) * 2**20 / n, 1), round(r["recall"], 3),
                         round(r["qps"]), ", ".join(f"{k} {v}" for k, v in r["params"].items())])
        print(f"  {n:,}: shards on disk {shard_bytes / n:.0f} B/vector", flush=True)
        if n <= args.ingest_max:
            ing = run(child_ingest, str(root), n)
            ing["n"] = n
            results.append({"ingest": ing})
            print(f"  {n:,} catalog ingest: {n / ing['seconds']:,.0f} vectors/s, {ing['bytes'] / n:.0f} B/vector "
                  f"on disk, peak RSS {ing['peak_mb']:.0f} MiB; one pass over the catalog's vectors "
                  f"{ing['pass_s']:.1f} s ({ing['read'] / ing['pass_s']:,.0f} vectors/s)", flush=True)
    print()
    print(table(["vectors", "build", "total s", "train s", "add s", "tune s", "peak RSS MiB", "index B/vec",
                 "RSS B/vec", "recall@10", "QPS (batch)", "search params"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
