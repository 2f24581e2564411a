"""Images per second of `dualsearch index` against a naive loop, on generated 640x480 JPEGs.

    python bench/index_speed.py [--images 2000]

naive: open each file with PIL, decode at full size, resize + centre-crop, batch 64 through the
same model in torch (inference mode), one process.
dualsearch: `build_index` (DataLoader workers, reduced-size JPEG decoding, ONNX Runtime on CPU,
batched catalog commits), into a fresh index; run as a subprocess per collection size to
record peak memory (process + workers) as the collection grows.
spark: `--engine spark` in Spark local[2] on the same machine, shards of 250 images (the Spark
job's wall time, Python workers' start-up included; worker memory is the largest Python worker's).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, shapes, table  # noqa: E402
from dualsearch.config import ModelConfig  # noqa: E402
from dualsearch.data.images import resize_center_crop  # noqa: E402
from dualsearch.model.dual_encoder import DualEncoder  # noqa: E402

CHILD = """
import json, resource, sys, time
from dualsearch.index.build import build_index, build_index_spark
t0 = time.perf_counter()
if sys.argv[4] == "spark":
    r = build_index_spark(sys.argv[1], sys.argv[2], sys.argv[3], master="local[2]", shard_size=250)
    kids = r.worker_peak_mb * 1024
else:
    r = build_index(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, engine=sys.argv[4])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
from dualsearch.index.spark import peak_rss_mb  # VmHWM: ru_maxrss would include the parent's at fork
print(json.dumps({"added": r.added, "embed_s": r.embed_seconds, "total_s": time.perf_counter() - t0,
                  "engine": r.engine, "rss_mb": peak_rss_mb(), "worker_rss_mb": kids / 1024}))
"""


def naive(model: DualEncoder, files: list[Path], batch: int = 64) -> float:
    from PIL import Image

    prep = model.image_tower.preprocessor()
    t0 = time.perf_counter()
    buf = []
    for p in files:
        with Image.open(p) as im:
            img = im.convert("RGB")
        buf.append(prep(resize_center_crop(img, model.image_tower.image_size)))
        if len(buf) == batch:
            model.embed_pixels(torch.stack(buf))
            buf = []
    if buf:
        model.embed_pixels(torch.stack(buf))
    return len(files) / (time.perf_counter() - t0)


def ours(folder: Path, model_dir: Path, out: Path, engine: str = "auto") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(model_dir), str(out), engine],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ds = shapes("index", args.images, seed=9, size="640x480")
    root = Path(ds.records[0].image.path).parent
    files = sorted(root.glob("*.jpg"))
    model_dir = BENCH_DIR / "index-model"
    model = DualEncoder(ModelConfig()).eval()
    model.save(model_dir)
    model = DualEncoder.load(model_dir)

    rows = []
    base = naive(model, files)
    rows.append(["naive loop (PIL full decode, torch)", len(files), round(base, 1), "1.0x", "-"])
    print(rows[-1], flush=True)
    for engine in ("torch", "auto", "spark"):
        r = ours(root, model_dir, BENCH_DIR / "index-out", engine)
        rate = r["added"] / r["embed_s"]
        used = r["engine"].split(",")[0]
        rows.append([f"dualsearch index (engine {engine} -> {used})", r["added"], round(rate, 1),
                     f"{rate / base:.1f}x", f"{r['rss_mb']:.0f} + {r['worker_rss_mb']:.0f} MiB"])
        print(rows[-1], flush=True)
    # memory as the collection grows: subsets in sub-folders of links
    mem_rows = []
    for n in sorted({max(1, len(files) // 4), max(1, len(files) // 2), len(files)}):
        sub = BENCH_DIR / f"index-subset-{n}"
        if not sub.is_dir():
            sub.mkdir(parents=True)
            for p in files[:n]:
                (sub / p.name).symlink_to(p.resolve())
        r = ours(sub, model_dir, BENCH_DIR / "index-out", "auto")
        mem_rows.append([n, round(r["added"] / r["embed_s"], 1), f"{r['rss_mb']:.0f}", f"{r['worker_rss_mb']:.0f}"])
        print(mem_rows[-1], flush=True)
    print(f"\nbench/index_speed.py: {len(files)} generated 640x480 JPEGs, EfficientNet-Lite0 224 px; {machine()}")
    print(table(["pipeline", "images", "img/s", "vs naive", "peak RSS (main + workers)"], rows))
    print("\nmemory as the collection grows (engine auto):")
    print(table(["images", "img/s", "peak RSS main MiB", "peak RSS worker MiB"], mem_rows))


if __name__ == "__main__":
    main()
