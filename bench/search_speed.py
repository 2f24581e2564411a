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
import os
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


def text_int8() -> list[list]:
    """The default text tower's ONNX text encoder (MiniLM-L6 + head), fp32 against a dynamically
    quantised INT8 copy (:func:`dualsearch.encode.quantize.quantize_text_dynamic`): one-query
    latency (interleaved, 60 queries each) and the cosine of their embeddings."""
    import tempfile
    from pathlib import Path

    from dualsearch.config import ModelConfig
    from dualsearch.encode.export import export_text_encoder
    from dualsearch.encode.onnx_encoders import OnnxTextEncoder
    from dualsearch.encode.quantize import quantize_text_dynamic
    from dualsearch.encode.runtime import ort_session
    from dualsearch.model.dual_encoder import DualEncoder

    folder = Path(tempfile.mkdtemp(prefix="text-int8-"))
    export_text_encoder(DualEncoder(ModelConfig()).eval(), folder)
    quantize_text_dynamic(folder / "text_encoder.onnx", folder / "text_encoder.int8.onnx")
    fp32 = OnnxTextEncoder(folder)
    int8 = OnnxTextEncoder(folder)
    int8.session = ort_session(folder / "text_encoder.int8.onnx")
    queries = ["a red circle", "two blue stars above a green square", "a dog on the beach in the snow",
               "my bike leaning against a wall at night"] * 15
    lat: dict = {"fp32": [], "int8": []}
    for enc in (fp32, int8):
        enc.embed(["warm up"])
    for q in queries:
        for name, enc in (("fp32", fp32), ("int8", int8)):
            t0 = time.perf_counter()
            enc.embed([q])
            lat[name].append((time.perf_counter() - t0) * 1000)
    a, b = fp32.embed(queries[:4]), int8.embed(queries[:4])
    cos = float(np.mean(np.sum(a * b, axis=1)))
    sizes = {n: (folder / f).stat().st_size / 2**20 for n, f in (("fp32", "text_encoder.onnx"),
                                                                 ("int8", "text_encoder.int8.onnx"))}
    return [[n, round(float(np.percentile(v, 50)), 2), round(float(np.percentile(v, 99)), 2), f"{sizes[n]:.0f} MiB",
             "1" if n == "fp32" else f"{cos:.4f}"] for n, v in lat.items()]


def _serve_ready(exe: str, out, port: int):
    """Start `dualsearch serve OUT` -> (process, seconds to its first answered /health)."""
    import subprocess
    import urllib.request

    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "serve", str(out), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return proc, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"dualsearch serve {out} exited with {proc.returncode}") from None
            time.sleep(0.02)


def _rss_mib(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile of process ``pid`` in MiB (/proc/PID/status)."""
    from pathlib import Path

    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(ln.split()[1]) / 1024 for ln in lines for k in ("VmRSS", "RssAnon", "RssFile")
            if ln.startswith(k + ":")}


def startup(n: int = 1_000_000, runs: int = 5, kind: str = "flat") -> list[list]:
    """Cold start: `dualsearch search INDEX TEXT` (a fresh process, median of ``runs``) and the time
    from starting `dualsearch serve INDEX` to its first answered /health, then the server's resident
    memory after 200 text searches, on an index of ``n`` clustered vectors of kind ``kind`` (flat:
    the largest file to read, 1 GiB at 1M; ivfpq: on disk, lists and refine codes memory-mapped;
    built once under bench-out/) with the default model's text encoder."""
    import shutil
    import socket
    import statistics
    import subprocess
    import urllib.parse
    import urllib.request
    from pathlib import Path

    from _common import BENCH_DIR
    from dualsearch.config import ModelConfig
    from dualsearch.index.build import index_vectors
    from dualsearch.model.dual_encoder import DualEncoder

    model_dir = BENCH_DIR / "index-model"
    out = BENCH_DIR / (f"startup-{n}" if kind == "flat" else f"startup-{n}-{kind}")
    if not (model_dir / "config.json").is_file():
        DualEncoder(ModelConfig()).eval().save(model_dir)
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        x, _ = make("clustered", n, 1)
        index_vectors(out, model_dir, [f"/nonexistent/img{i:07d}.jpg" for i in range(n)], x, kind=kind)
    exe = str(Path(sys.executable).with_name("dualsearch"))
    cold = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([exe, "search", str(out), "a red circle", "-k", "5"], check=True, capture_output=True)
        cold.append(time.perf_counter() - t0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc, ready = _serve_ready(exe, out, port)
    try:
        at_ready = _rss_mib(proc.pid)
        words = ("red", "blue", "circle", "square", "star", "two", "small", "large", "green", "triangle")
        for i in range(200):
            q = urllib.parse.quote(f"a {words[i % 10]} {words[(i * 7) % 10]} on white {i}")
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q={q}&k=9", timeout=30).read()
        after = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    files = sum(f.stat().st_size for f in out.glob("vectors.faiss*"))
    return [[n, kind, f"{statistics.median(cold):.2f} s (min {min(cold):.2f}, max {max(cold):.2f})",
             f"{ready:.2f} s", f"{at_ready['VmRSS']:.0f} MiB",
             f"{after['VmRSS']:.0f} MiB (anon {after['RssAnon']:.0f}, file {after['RssFile']:.0f})",
             f"{files / 2**20:.0f} MiB", "load %.1f" % os.getloadavg()[0]]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--data", default="uniform,clustered")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end text query timing")
    ap.add_argument("--only-text-int8", action="store_true", help="only the INT8 text encoder latency table")
    ap.add_argument("--startup", type=int, metavar="N", default=0,
                    help="only the cold-start table: search and serve on an index of N vectors (e.g. 1000000)")
    ap.add_argument("--startup-kinds", default="flat", help="index kinds for --startup (flat, hnsw, ivfpq)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.startup:
        rows = [r for kind in args.startup_kinds.split(",") for r in startup(args.startup, kind=kind)]
        print(table(["vectors", "index", "search cold (CLI, fresh process)", "serve: start to first /health",
                     "serve RSS at start", "serve RSS after 200 searches", "index files", "load"], rows))
        return
    int8 = text_int8()
    print("\ntext encoder latency, one query (ONNX Runtime, default threads), fp32 against INT8 (dynamic):")
    print(table(["text encoder", "p50 ms", "p99 ms", "file", "cosine to fp32"], int8), flush=True)
    if args.only_text_int8:
        return
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
