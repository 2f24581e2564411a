"""A bounded load on `dualsearch serve` over a 100k-image index, on 127.0.0.1 only.

    python bench/serve_load.py [--vectors 100000] [--clients 20] [--queries 2000]

The index holds clustered synthetic vectors (d=256) recorded with a model whose text tower is the
default MiniLM, so each request does the real work: encode the query, search, map ids to paths.
While the clients run, a separate probe calls /health every 100 ms. The baseline row is the same
queries sent by a single client, in the same run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, table  # noqa: E402

WORDS = "red green blue yellow purple orange small large circle square triangle star two three above left".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_index(n: int) -> Path:
    from dualsearch.config import ModelConfig
    from dualsearch.index.build import index_vectors
    from dualsearch.model.dual_encoder import DualEncoder

    out = BENCH_DIR / f"serve-index-{n}"
    if (out / "manifest.json").is_file():
        return out
    model_dir = BENCH_DIR / "serve-model"
    DualEncoder(ModelConfig()).save(model_dir)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, 256))
    x = centers[rng.integers(0, 1000, n)] + rng.normal(scale=0.7, size=(n, 256))
    index_vectors(out, model_dir, [f"/collection/img{i:07d}.jpg" for i in range(n)], x.astype(np.float32))
    return out


def run_load(url: str, queries: list[str], clients: int, deadline_s: float) -> dict:
    lat, errors = [], 0
    stop = time.time() + deadline_s

    def worker(chunk: list[str]):
        nonlocal errors
        out = []
        with httpx.Client(base_url=url, timeout=30) as c:
            for q in chunk:
                if time.time() > stop:
                    break
                t0 = time.perf_counter()
                try:
                    r = c.get("/api/search", params={"q": q, "k": 9})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 9
                except httpx.HTTPError:
                    ok = False
                out.append(time.perf_counter() - t0)
                if not ok:
                    errors += 1
        return out

    chunks = [queries[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        for part in pool.map(worker, chunks):
            lat += part
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"n": len(lat), "rps": len(lat) / wall, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--clients", default="5,20,50", help="client counts to run after the 1-client baseline")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=600)
    args = ap.parse_args()
    index = make_index(args.vectors)
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(args.queries)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dualsearch.cli", "-q", "serve", str(index), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows, health = [], []
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        single = run_load(url, queries[:200], 1, args.max_seconds)
        rows.append(_row("1 client (baseline)", single, single))
        for clients in (int(c) for c in args.clients.split(",")):
            loaded, probes = _with_probe(url, lambda n=clients: run_load(url, queries, n, args.max_seconds))
            health += probes
            rows.append(_row(f"{clients} clients", loaded, single))
    finally:
        proc.terminate()
        proc.wait(10)
    h = np.array([x for x, _ in health])
    print(f"\nbench/serve_load.py: {args.vectors} vectors, text queries k=9 on 127.0.0.1; {machine()}")
    print(table(["load", "requests", "req/s", "x 1 client", "p50 ms", "p95 ms", "p99 ms", "errors"], rows))
    print(f"/health during the loads: {len(h)} probes, max {h.max():.1f} ms, p99 {np.percentile(h, 99):.1f} ms, "
          f"failures {sum(1 for _, ok in health if not ok)} (target: all within 100 ms)")
    print("targets: 20 clients >= 4x the 1-client req/s, p99 < 150 ms, 0 errors")


def _row(name: str, r: dict, single: dict) -> list:
    return [name, r["n"], round(r["rps"], 1), round(r["rps"] / single["rps"], 2), round(r["p50"], 1),
            round(r["p95"], 1), round(r["p99"], 1), r["errors"]]


def _with_probe(url: str, load) -> tuple[dict, list]:
    """Run ``load()`` while a probe calls /health every 100 ms: (its result, [(ms, ok), ...])."""
    health, done = [], threading.Event()

    def probe():
        with httpx.Client(base_url=url, timeout=10) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                ok = c.get("/health").status_code == 200
                health.append(((time.perf_counter() - t0) * 1000, ok))
                time.sleep(0.1)

    t = threading.Thread(target=probe)
    t.start()
    try:
        return load(), health
    finally:
        done.set()
        t.join()


if __name__ == "__main__":
    main()
