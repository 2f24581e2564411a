"""The IVF-PQ index built on a Spark Standalone cluster against the same index built on one node.

    python bench/scale_cluster.py [--sizes 1000000,10000000] [--workers 2] [--shard-rows 250000]

For each size, the Parquet shards of bench/scale.py (synthetic clustered unit vectors, d=256, in
the layout Spark executors write; made once), then, each in a fresh process:
  - one node: ``ondisk.build_local`` (bench/scale.py's mode ``ondisk-pq32``: sample, train,
    ``add_shard`` per 250,000 vectors, ``merge``, tune, all in one process);
  - cluster: a Standalone master and ``--workers`` workers of 1 core on 127.0.0.1 (started here);
    the driver records the shards in a catalog (:func:`dualsearch.index.spark.ingest`: references,
    no vectors) and runs :func:`dualsearch.index.distributed.build` (tasks sample and add; the
    driver trains, merges and tunes);
then bench/scale.py's query process on each index: resident bytes per vector after 1,000 queries,
recall@10 against exact search, QPS. On one machine the workers share its cores with the driver:
the cluster row measures the route's overheads and memory per process, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import scale  # noqa: E402
from _cluster import standalone  # noqa: E402
from _common import machine, table  # noqa: E402

MODE = "cluster-pq32"


def child_cluster(root: str, n: int, master: str, out: mp.Queue) -> None:
    """The driver of the cluster build: -> ingest time and catalog bytes, build timings, driver and
    Python worker peak RSS, index bytes, recall@10 at the tuned parameters."""
    from dualsearch.index import ann, distributed
    from dualsearch.index import spark as sp
    from dualsearch.index.catalog import Catalog
    from dualsearch.index.plan import SHARD_PREFIX, Part
    from dualsearch.storage import write_bytes

    os.environ["PYSPARK_PYTHON"] = sys.executable
    root = Path(root).resolve()
    folder = scale.index_dir(root, MODE)
    shutil.rmtree(folder, ignore_errors=True)
    cat = Catalog(folder, create=True)
    cat.set_shards_uri(str(root))
    t0 = time.perf_counter()
    for f in sorted(root.glob(f"{SHARD_PREFIX}*.parquet")):
        sp.ingest(cat, Part(f.stem[len(SHARD_PREFIX):], "files", ()), str(root), scale.DIM)
    ingest_s = time.perf_counter() - t0
    catalog_bytes = sum(p.stat().st_size for p in folder.glob("catalog.sqlite*"))
    session = sp.spark_session(master)
    t1 = time.perf_counter()
    built = distributed.build(session, cat, scale.DIM, folder, pq_bytes=32)
    seconds = time.perf_counter() - t1
    session.stop()
    cat.close()
    write_bytes(folder / "params.json", json.dumps(built.params).encode())
    index_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("vectors.faiss"))
    queries = scale.sample(scale.np.random.default_rng(7), 1000, scale.centers())
    truth = scale.exact_truth(root, queries, scale.shard_batches(root))
    out.put({"mode": MODE, "seconds": seconds, "parts": built.seconds, "peak_mb": sp.peak_rss_mb(),
             "task_peak_mb": built.stats["task_peak_mb"], "tasks": built.stats["tasks"], "index_bytes": index_bytes,
             "recall": ann.recall_at(built.index, queries, truth), "params": built.params, "ingest_s": ingest_s,
             "catalog_bytes": catalog_bytes})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-memory", default="6g")
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(f"# bench/scale_cluster.py on {machine()}")
    rows, results = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = scale.write_shards(n, args.shard_rows)
        local = scale.run(scale.child_build, str(root), n, "ondisk-pq32", 8e9, args.shard_rows, 0.95)
        local["query"] = scale.run(scale.child_query, str(root), n, "ondisk-pq32")
        print(f"  {n:,} one node: {json.dumps(local)}", flush=True)
        with standalone(args.workers, 1, args.worker_memory) as master:
            dist = scale.run(child_cluster, str(root), n, master)
        dist["query"] = scale.run(scale.child_query, str(root), n, MODE)
        for r in (local, dist):
            r["n"] = n
            results.append(r)
            print(f"  {n:,} {r['mode']}: {json.dumps(r)}", flush=True)
            q = r["query"]
            rows.append([f"{n:,}", "one node" if r is local else f"cluster, {args.workers} workers x 1 core",
                         round(r["seconds"]), " / ".join(f"{k} {v:.0f}" for k, v in r["parts"].items()),
                         round(r["peak_mb"]), round(r.get("task_peak_mb", 0)) or "-",
                         round(r["index_bytes"] / n, 1), round(q["resident"]["VmRSS"], 1),
                         round(q["resident"]["RssAnon"], 1), round(q["recall"], 3), round(q["batch_qps"]),
                         round(q["single_qps"]), ", ".join(f"{k} {v}" for k, v in r["params"].items()
                                                           if k in ("nprobe", "k_factor"))])
        print(f"  {n:,} cluster: catalog of references {dist['catalog_bytes'] / n:.0f} B/vector on disk, shards "
              f"recorded at {n / dist['ingest_s']:,.0f} vectors/s", flush=True)
    print()
    print(table(["vectors", "build", "total s", "s by step", "driver peak RSS MiB", "task peak RSS MiB",
                 "B/vec on disk", "resident B/vec", "RssAnon B/vec", "recall@10", "QPS (batch)", "QPS (1 at a time)",
                 "tuned"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
