"""Large IVF-PQ indexes built shard by shard, as the Spark path builds them: time, memory, recall.

    python bench/scale.py [--sizes 1000000,10000000] [--shard-rows 250000] [--baseline-max 1000000]
                          [--modes shards,baseline,ondisk-pq32,ondisk-pq16,ondisk-pq32-fp16] [--target-recall 0.95]

For each size, synthetic clustered unit vectors (d=256, a mixture of 1,000 Gaussians, as in
bench/search_speed.py) are written once as Parquet shards in the layout Spark executors write
(bench-out/scale-N/part-*.parquet). Each build then runs in a fresh process so that its peak RSS is
its own:
  - shard by shard (``shards``): ``ann.build_stream`` reading one shard at a time (train on a
    sample, add shard by shard, tune against exact neighbours computed shard by shard), IVF-PQ
    fast-scan with fp16 (or SQ8) refine codes in RAM;
  - baseline (sizes up to --baseline-max): every vector loaded into memory, then ``ann.build``;
  - on disk (``ondisk-pqM``): ``ondisk.build_local``, the distributed build's functions in one
    process (train once, ``add_shard`` per Parquet shard's worth of vectors, ``merge`` into
    ``OnDiskInvertedLists``), IVF-PQ with M-byte classic PQ codes and SQ8 refine codes left on disk
    (``ondisk-pq32-fp16``: fp16 refine codes, 2 x D bytes a vector on disk, memory-mapped the same way).
Recall@10 is measured with 1,000 fresh queries against exact search (computed shard by shard), at
the parameters the build tuned. Bytes per vector: the index's files / N, and the build's peak
RSS / N. Each index is then written to bench-out/scale-N/index-MODE/ and opened in another fresh
process with ``ann.read`` (memory-mapped), which runs the 1,000 queries as one batch through
``ann.search`` and reports resident bytes per vector: (VmRSS after the batch - VmRSS before opening) / N,
and the same for RssFile (mapped file pages: page cache, reclaimable) and RssAnon (the process's own
memory) from /proc/self/status, RssFile split by file from /proc/self/smaps (the ``.ivfdata`` lists;
the index file, whose refine codes and flat quantizer ``IO_FLAG_MMAP_IFC`` maps); then QPS of the
batch and of 200 queries one at a time. A warm-up search on a tiny index comes first, so that
FAISS's code pages and threads are not counted. The builds tune for --target-recall (0.95). At 1M it also
times ingesting the shards into a catalog (the Spark path's step between the shards and the build),
its bytes per vector on disk, and one pass over its vectors (the product's build reads the catalog
three times).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
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


def index_dir(root: Path, mode: str) -> Path:
    return Path(root) / f"index-{mode}"


def child_build(root: str, n: int, mode: str, budget: float, shard_rows: int, target: float, out: mp.Queue) -> None:
    """One build in its own process: -> timings, peak RSS, index bytes, recall@10; the index is
    left in ``index_dir(root, mode)`` for :func:`child_query`."""
    import faiss

    from dualsearch.index import ann, ondisk
    from dualsearch.storage import write_bytes

    root = Path(root)
    folder = index_dir(root, mode)
    base = peak_rss_mb()
    batches = shard_batches(root)
    t0 = time.perf_counter()
    if mode == "baseline":
        ids, vecs = zip(*batches())
        built = ann.build(np.concatenate(vecs), np.concatenate(ids), "ivfpq", budget, target)
    elif mode.startswith("ondisk-pq"):
        pq, _, codes = mode[len("ondisk-pq"):].partition("-")
        built = ondisk.build_local(batches, n, DIM, folder, shard_rows, pq_bytes=int(pq),
                                   refine="SQfp16" if codes == "fp16" else "SQ8", target_recall=target)
    else:
        built = ann.build_stream(batches, n, DIM, "ivfpq", budget, target)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    if not mode.startswith("ondisk"):
        ann.write(built.index, folder / "vectors.faiss")
    write_bytes(folder / "params.json", json.dumps(built.params).encode())
    index_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name != "params.json")
    queries = sample(np.random.default_rng(7), 1000, centers())
    truth = exact_truth(root, queries, batches)
    ann.set_params(built.index, built.params)
    t1 = time.perf_counter()
    recall = ann.recall_at(built.index, queries, truth)
    qps = len(queries) / (time.perf_counter() - t1)
    out.put({"mode": mode, "seconds": seconds, "parts": built.seconds, "peak_mb": peak, "base_mb": base,
             "index_bytes": index_bytes, "recall": recall, "qps": qps, "params": built.params,
             "factory": faiss.downcast_index(ann._inner(built.index)).__class__.__name__})


def exact_truth(root: Path, queries: np.ndarray, batches) -> np.ndarray:
    """The exact top-10 of the 1,000 bench queries (computed once per size, kept beside the shards)."""
    from dualsearch.index import ann

    path = Path(root) / "truth.npy"
    if not path.is_file():
        np.save(path, ann.exact_knn(queries, batches, 10)[1])
    return np.load(path)


def status_kb() -> dict:
    """VmRSS, RssFile and RssAnon of this process (kB) from /proc/self/status."""
    want = ("VmRSS", "RssFile", "RssAnon")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(line.split()[1]) for line in lines for k in want if line.startswith(k + ":")}


def warm_up() -> None:
    """A search on a tiny in-memory IVF-PQ index first, so that FAISS's code pages and OpenMP
    threads are not counted as the index's resident memory."""
    import faiss

    x = sample(np.random.default_rng(3), 10_000, centers())
    index = faiss.index_factory(DIM, "IVF4,PQ32x8,Refine(SQ8)", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.search(x[:100], 10)


def mapped_kb(folder: Path) -> dict:
    """Resident kB of this process's mappings of the index files (/proc/self/smaps): the index file
    (refine codes, memory-mapped by ``IO_FLAG_MMAP_IFC``) and the ``.ivfdata`` inverted lists."""
    got = {"index file": 0, "ivfdata": 0}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
            path = head[5] if len(head) > 5 else ""
            name = None if not path.startswith(str(folder.resolve())) else \
                "ivfdata" if path.endswith(".ivfdata") else "index file"
        elif name and head[0] == "Rss:":
            got[name] += int(head[1])
    return got


def child_query(root: str, n: int, mode: str, out: mp.Queue) -> None:
    """A fresh process opens the index with ``ann.read`` (memory-mapped) and searches: -> open
    time, resident bytes per vector (VmRSS / RssFile / RssAnon grown since before opening), recall@10,
    QPS for the 1,000-query batch and for 200 queries one at a time."""
    from dualsearch.index import ann

    folder = index_dir(Path(root), mode)
    params = json.loads((folder / "params.json").read_text())
    queries = sample(np.random.default_rng(7), 1000, centers())
    truth = np.load(Path(root) / "truth.npy")
    warm_up()
    before = status_kb()
    t0 = time.perf_counter()
    index = ann.read(folder / "vectors.faiss", params)
    open_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    _, got = ann.search(index, queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - t1)
    after = status_kb()
    mapped = mapped_kb(folder)
    hits = sum(len(set(g[g >= 0]) & set(t)) for g, t in zip(got, truth))
    t2 = time.perf_counter()
    for q in queries[:200]:
        ann.search(index, q[None], 10)
    single_qps = 200 / (time.perf_counter() - t2)
    grown = {k: (after[k] - before[k]) * 1024 / n for k in after}
    grown.update({f"RssFile {k}": v * 1024 / n for k, v in mapped.items()})
    out.put({"mode": mode, "open_s": open_s, "resident": grown, "after_kb": after, "recall": hits / truth.size,
             "batch_qps": batch_qps, "single_qps": single_qps})


def child_ingest(root: str, n: int, out: mp.Queue) -> None:
    """Shards -> a catalog, as the Spark path ingests them (one transaction per shard: rows that refer
    to their vectors in the shards), then one pass over the vectors (read back from the shards)."""
    import tempfile

    from dualsearch.index import spark as sp
    from dualsearch.index.catalog import Catalog
    from dualsearch.index.plan import SHARD_PREFIX, Part

    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as d:
        cat = Catalog(d, create=True)
        cat.set_shards_uri(str(root))
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
    """``target(*args, queue)`` in a fresh process: what it put on the queue; RuntimeError if it died."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{target.__name__} died (exit code {p.exitcode})") from None
    p.join()
    return res


MODES = ("shards", "baseline", "ondisk-pq32", "ondisk-pq16", "ondisk-pq32-fp16")
LABELS = {"shards": "shard by shard", "baseline": "all in memory (baseline)", "ondisk-pq32": "on disk, PQ32 + SQ8",
          "ondisk-pq16": "on disk, PQ16 + SQ8", "ondisk-pq32-fp16": "on disk, PQ32 + fp16"}


def build_row(n: int, r: dict) -> list:
    parts = r["parts"]
    return [f"{n:,}", LABELS[r["mode"]], round(r["seconds"]), round(parts.get("train", 0)),
            round(parts.get("add", 0) + parts.get("merge", 0)), round(parts.get("tune", 0)), round(r["peak_mb"]),
            round(r["index_bytes"] / n, 1), round((r["peak_mb"] - r["base_mb"]) * 2**20 / n, 1),
            round(r["recall"], 3), round(r["qps"]),
            ", ".join(f"{k} {v}" for k, v in r["params"].items() if k in ("nprobe", "k_factor", "refine"))]


def query_row(n: int, q: dict) -> list:
    res = q["resident"]
    return [f"{n:,}", LABELS[q["mode"]], round(q["open_s"], 2), round(res["VmRSS"], 1), round(res["RssFile"], 1),
            round(res.get("RssFile ivfdata", float("nan")), 1), round(res.get("RssFile index file", float("nan")), 1),
            round(res["RssAnon"], 1), round(q["recall"], 3), round(q["batch_qps"]), round(q["single_qps"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--baseline-max", type=int, default=1_000_000)
    ap.add_argument("--ingest-max", type=int, default=1_000_000)
    ap.add_argument("--modes", default=",".join(MODES), help=f"builds to run, of {', '.join(MODES)}")
    ap.add_argument("--memory-budget", type=float, default=8.0,
                    help="GB, as `index --memory-budget`: it picks the refine codes (fp16 when they fit, else SQ8)")
    ap.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the builds tune for")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    wanted = args.modes.split(",")
    if set(wanted) - set(MODES):
        ap.error(f"--modes: unknown {', '.join(sorted(set(wanted) - set(MODES)))}; choose from {', '.join(MODES)}")
    print(f"# bench/scale.py on {machine()}")
    rows, qrows, results = [], [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = write_shards(n, args.shard_rows)
        shard_bytes = sum(f.stat().st_size for f in root.glob("part-*.parquet"))
        for mode in [m for m in wanted if m != "baseline" or n <= args.baseline_max]:
            r = run(child_build, str(root), n, mode, args.memory_budget * 1e9, args.shard_rows, args.target_recall)
            q = run(child_query, str(root), n, mode)
            r["n"], r["query"] = n, q
            results.append(r)
            print(f"  {n:,} {mode}: {json.dumps(r)}", flush=True)
            rows.append(build_row(n, r))
            qrows.append(query_row(n, q))
        print(f"  {n:,}: shards on disk {shard_bytes / n:.0f} B/vector", flush=True)
        if n <= args.ingest_max and "shards" in wanted:
            try:
                ing = run(child_ingest, str(root), n)
            except RuntimeError as e:
                print(f"  {n:,} catalog ingest: {e}", flush=True)
                continue
            ing["n"] = n
            results.append({"ingest": ing})
            print(f"  {n:,} catalog ingest: {n / ing['seconds']:,.0f} vectors/s, {ing['bytes'] / n:.0f} B/vector "
                  f"on disk, peak RSS {ing['peak_mb']:.0f} MiB; one pass over the catalog's vectors "
                  f"{ing['pass_s']:.1f} s ({ing['read'] / ing['pass_s']:,.0f} vectors/s)", flush=True)
    print()
    print(table(["vectors", "build", "total s", "train s", "add (+merge) s", "tune s", "peak RSS MiB",
                 "index B/vec on disk", "RSS B/vec", "recall@10", "QPS (batch)", "search params"], rows))
    print()
    print(table(["vectors", "build", "open s", "resident B/vec (VmRSS)", "RssFile B/vec", "of which .ivfdata",
                 "of which index file", "RssAnon B/vec",
                 "recall@10", "QPS (1,000 batch)", "QPS (1 at a time)"], qrows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
