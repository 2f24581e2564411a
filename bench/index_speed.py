"""Images per second of `dualsearch index` against the limit the engine and the decoder set, on
generated 640x480 JPEGs with EfficientNet-Lite0 at 224 px (`--image-tower efficientnet-lite2`: at its 260 px).

    python bench/index_speed.py [--images 2000] [--compare] [--skip-quality]

engine alone: the verified ONNX export in ONNX Runtime fp32, batch 64 of random input, on all
cores (and on one thread, batch 8: what one lane runs). decode alone: Pillow with draft mode
(JPEG 640x480 decoded at 1/2 scale), resize + centre crop to 224, normalised, one thread.
limit: with C cores, an image costs 1/decode core-seconds of decoding and C/engine of encoding, so
C cores embed at most C / (1/decode + C/engine) img/s. Engine and decode are measured before and
after the pipelines (the machine is shared) and the limit uses their means.
pipelines: `build_index` in a fresh subprocess into a fresh index (peak RSS: its VmHWM plus the
largest decoding worker's); "first run" exports and checks the encoders (torch), the later
runs find the verified exports and import no torch; INT8: `--precision int8` (quantised once,
calibrated on the collection, before the timed run). --compare adds the naive loop, `--engine
torch` and Spark local[2] rows. Quality of INT8 (unless --skip-quality): a model trained on 300
generated scenes, 100 held-out ones indexed fp32 and INT8: text->image R@1/5/10, and recall@10
overlap of the INT8 index against the fp32 one with the held-out captions as queries.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, session_rate, shapes, table  # noqa: E402
from dualsearch.encode.pipeline import MAX_ONNX_BATCH  # noqa: E402

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from dualsearch.index.build import build_index, build_index_spark
if sys.argv[4] == "spark":
    r = build_index_spark(sys.argv[1], sys.argv[2], sys.argv[3], master="local[2]", shard_size=250)
    kids = r.worker_peak_mb * 1024
else:
    workers = None if sys.argv[6] == "auto" else int(sys.argv[6])
    r = build_index(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, engine=sys.argv[4],
                    precision=sys.argv[5], num_workers=workers)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
from dualsearch.index.spark import peak_rss_mb  # VmHWM: ru_maxrss would include the parent's at fork
print(json.dumps({"added": r.added, "embed_s": r.embed_seconds, "total_s": time.perf_counter() - t0,
                  "engine": r.engine, "rss_mb": peak_rss_mb(), "worker_rss_mb": kids / 1024,
                  "torch": "torch" in sys.modules}))
"""


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


SIZE = 224  # the image tower's input size (--image-tower sets it)


def engine_rate(path: str, threads: int, batch: int, seconds: float = 4.0) -> float:
    from dualsearch.encode.runtime import ort_session

    return session_rate(ort_session(path, threads), SIZE, batch, seconds)


def decode_rate(files: list[Path], n: int = 300) -> float:
    from dualsearch.data.images import ImagePreprocessor
    from dualsearch.encode.pipeline import decode

    prep = ImagePreprocessor(SIZE, (0.5,) * 3, (0.5,) * 3, "crop")
    t0 = time.perf_counter()
    for p in files[:n]:
        decode(str(p), prep)
    return min(n, len(files)) / (time.perf_counter() - t0)


def run_index(folder: Path, model_dir: Path, out: Path, engine: str = "auto", precision: str = "fp32",
              workers: str = "auto") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(model_dir), str(out), engine, precision,
                          workers], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["rate"] = r["added"] / r["embed_s"]
    return r


def limits(encoder: str, files: list[Path], cores: int) -> tuple[float, float, float]:
    """-> (engine img/s on all cores, batch 64; on one thread, a lane's batch; decode img/s, one thread)."""
    return engine_rate(encoder, cores, 64), engine_rate(encoder, 1, MAX_ONNX_BATCH), decode_rate(files)


def speed_rows(root: Path, model_dir: Path, encoder_of, compare: bool) -> list[list]:
    from dualsearch.encode.pipeline import cpu_count

    files = sorted(root.glob("*.jpg"))
    cores = cpu_count()
    out = BENCH_DIR / "index-out"
    pipes = [("first run (exports + checks the encoders: torch)", run_index(root, model_dir, out))]
    before = limits(encoder_of(), files, cores) + (load(),)
    print("engine/decode before:", before, flush=True)
    pipes.append((f"torch-free, fp32, {cores} lanes (default)", run_index(root, model_dir, out)))
    pipes.append(("torch-free, fp32, --workers 0 (decode, then encode on all cores)",
                  run_index(root, model_dir, out, workers="0")))
    run_index(root, model_dir, out, precision="int8")  # quantises once (calibrates on the collection)
    pipes.append((f"torch-free, INT8 (--precision int8), {cores} lanes", run_index(root, model_dir, out,
                                                                                  precision="int8")))
    if compare:
        pipes.append(("--engine torch (DataLoader workers)", run_index(root, model_dir, out, engine="torch")))
        pipes.append(("--engine spark (local[2], shards of 250)", run_index(root, model_dir, out, engine="spark")))
    after = limits(encoder_of(), files, cores) + (load(),)
    print("engine/decode after:", after, flush=True)
    eng, eng1, dec = [(a + b) / 2 for a, b in zip(before[:3], after[:3])]
    limit = cores / (1 / dec + cores / eng)
    rows = [[f"engine alone: ONNX fp32, batch 64, {cores} threads", round(eng, 1), "-", "-",
             f"{before[0]:.1f} / {after[0]:.1f} ({before[3]} / {after[3]})"],
            [f"engine alone: ONNX fp32, batch {MAX_ONNX_BATCH}, 1 thread (one lane)", round(eng1, 1), "-", "-",
             f"{before[1]:.1f} / {after[1]:.1f}"],
            [f"decode alone: Pillow draft 640x480 -> {SIZE}, 1 thread", round(dec, 1), "-", "-",
             f"{before[2]:.1f} / {after[2]:.1f}"],
            [f"limit: {cores} / (1/decode + {cores}/engine)", round(limit, 1), "100 %", "-", ""],
            [f"limit from the one-thread engine: {cores} / (1/decode + 1/engine_1)",
             round(cores / (1 / dec + 1 / eng1), 1), f"{100 * cores / (1 / dec + 1 / eng1) / limit:.0f} %", "-",
             f"what lanes can reach when {cores} threads scale worse than {cores} x 1"]]
    for name, r in pipes:
        rows.append([f"dualsearch index: {name}", round(r["rate"], 1), f"{100 * r['rate'] / limit:.0f} %",
                     f"{r['rss_mb']:.0f} + {r['worker_rss_mb']:.0f} MiB", f"{r['engine']}; torch imported: "
                     f"{r['torch']}"])
        print(rows[-1], flush=True)
    return rows


def naive_row(model_dir: Path, files: list[Path]) -> list:
    """PIL full decode, resize + centre crop, torch batches of 64, one process."""
    import torch
    from PIL import Image

    from dualsearch.data.images import resize_center_crop
    from dualsearch.model.dual_encoder import DualEncoder

    model = DualEncoder.load(model_dir)
    prep, buf, t0 = model.image_tower.preprocessor(), [], time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            buf.append(prep(resize_center_crop(im.convert("RGB"), 224)))
        if len(buf) == 64:
            model.embed_pixels(torch.stack(buf))
            buf = []
    if buf:
        model.embed_pixels(torch.stack(buf))
    return ["naive loop (PIL full decode, torch, batch 64)", round(len(files) / (time.perf_counter() - t0), 1),
            "-", "-", load()]


def quality_rows() -> list[list]:
    """INT8 against fp32 on held-out scenes with a trained model."""
    from dualsearch.encode.onnx_encoders import OnnxTextEncoder
    from dualsearch.eval import retrieval_metrics
    from dualsearch.index.catalog import Catalog

    train = shapes("quality-train", 300, seed=0, size="128")
    held = shapes("quality-held", 100, seed=1, size="128")
    model_dir = BENCH_DIR / "quality-model"
    if not (model_dir / "config.json").is_file():
        root = Path(train.records[0].image.path).parent.parent
        subprocess.run([sys.executable, "-m", "dualsearch.cli", "-q", "train", "--captions",
                        str(root / "captions.json"), "--images", str(root), "--out", str(model_dir), "--epochs", "10"],
                       check=True)
    folder = Path(held.records[0].image.path).parent
    vecs, rows = {}, []
    for precision in ("fp32", "int8"):
        out = BENCH_DIR / f"quality-index-{precision}"
        run_index(folder, model_dir, out, precision=precision)
        cat = Catalog(out, readonly=True)
        ids, v = cat.vectors(int(json.loads((out / "manifest.json").read_text())["dim"]))
        paths = cat.paths_for(ids)
        cat.close()
        vecs[precision] = {os.path.realpath(paths[int(i)]): x for i, x in zip(ids, v)}
    images = sorted({os.path.realpath(r.image.path) for r in held.records})
    captions = [(images.index(os.path.realpath(r.image.path)), c) for r in held.records for c in r.captions]
    text = OnnxTextEncoder(BENCH_DIR / "quality-index-fp32" / "text_encoder").embed([c for _, c in captions])
    tops = {}
    for precision, by_path in vecs.items():
        emb = np.stack([by_path[p] for p in images])
        m = retrieval_metrics(emb, text, np.array([i for i, _ in captions]), k=10)
        tops[precision] = np.argsort(-(text @ emb.T), axis=1)[:, :10]
        rows.append([precision, *(round(m.text_to_image[f"R@{k}"], 1) for k in (1, 5, 10)), "-"])
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops["fp32"], tops["int8"])])
    rows[-1][-1] = f"{overlap:.3f}"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--compare", action="store_true", help="also the naive loop, --engine torch and Spark")
    ap.add_argument("--skip-quality", action="store_true", help="skip the INT8 quality rows")
    ap.add_argument("--image-tower", default="efficientnet-lite0",
                    help="the (untrained) model's image tower: efficientnet-lite0 (224 px), -lite1 (240), -lite2 (260)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ds = shapes("index", args.images, seed=9, size="640x480")
    root = Path(ds.records[0].image.path).parent
    global SIZE
    from dualsearch.config import ModelConfig
    from dualsearch.model.dual_encoder import DualEncoder

    lite0 = args.image_tower == "efficientnet-lite0"
    model_dir = BENCH_DIR / ("index-model" if lite0 else f"index-model-{args.image_tower}")
    if not (model_dir / "config.json").is_file():
        DualEncoder(ModelConfig(image_tower=args.image_tower)).eval().save(model_dir)
    SIZE = DualEncoder.load(model_dir).image_tower.image_size

    def encoder_of() -> str:
        from dualsearch.encode.cache import default_cache_dir
        from dualsearch.encode.runtime import onnx_file
        from dualsearch.model.folder import model_content_hash

        return str(onnx_file(default_cache_dir(), f"encoder-{model_content_hash(model_dir)}"))

    rows = speed_rows(root, model_dir, encoder_of, args.compare)
    if args.compare:
        rows.append(naive_row(model_dir, sorted(root.glob("*.jpg"))))
    quality = None if args.skip_quality else quality_rows()
    print(f"\nbench/index_speed.py: {args.images} generated 640x480 JPEGs, {args.image_tower} {SIZE} px; {machine()}")
    print(table(["what", "img/s", "% of limit", "peak RSS (main + worker)", "notes"], rows))
    if quality:
        print("\nINT8 quality: model trained on 300 scenes (10 epochs), 100 held-out scenes, 500 captions")
        print(table(["image encoder", "text->image R@1", "R@5", "R@10", "recall@10 overlap with fp32"], quality))


if __name__ == "__main__":
    main()
