"""The GPU checks of issue 15, as one prepared script: training with the default recipe and with a
fully trainable image tower on the GPU (bf16-mixed), DDP over the devices there are, indexing with
the torch engine on the GPU, and ONNX Runtime's CUDA provider where it is installed; each against
the same step on this machine's CPU where that is affordable, in the same run.

    python bench/gpu.py                       # on a machine with CUDA: the table below
    python bench/gpu.py --dry-run             # no GPU: every step on the CPU at toy sizes (checks the script)
    python bench/gpu.py --images 3000 --epochs 5 --index-images 2000 --json out.json

Rows (generated shapes: ``--images`` training images, 10 % validation, 500 held out from another
seed; ``--index-images`` 640x480 JPEGs to index):
  - default recipe, frozen towers (features cached once on the device, then the heads train):
    first-run feature seconds, train seconds, held-out text->image R@5;
  - ``--image-trainable all --augment`` (the tower trains on raw pixels every step, bf16-mixed),
    ``--epochs`` epochs: seconds per epoch, R@5;
  - the same on every visible device with DDP (only when there are 2 or more);
  - ``dualsearch index --engine torch --device cuda``: images per second, against ONNX Runtime on
    the CPU (the default engine) in the same run;
  - ONNX Runtime's CUDA provider (``onnxruntime-gpu``): the image encoder's images per second at
    batch 64, against its CPU provider.
Without CUDA (and without ``--dry-run``) it says so in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, session_rate, shapes, table  # noqa: E402


def held_out_r5(model, records, cache) -> float:
    from dualsearch.encode.features import embed_records
    from dualsearch.eval import retrieval_metrics

    emb = embed_records(model, records, cache, show_progress=False)
    return retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image).text_to_image["R@5"]


def train_row(label: str, parts, accelerator: str, devices, cache: str, **overrides) -> list:
    """Train once; -> [label, device, features s, train s, s/epoch, epochs, R@5]."""
    from dualsearch.encode.features import tower_features
    from dualsearch.model.dual_encoder import DualEncoder
    from dualsearch.train.fit import fit, recipe

    train, val, test = parts
    mcfg, tcfg = recipe("default", **overrides)
    feat_s = "-"
    if mcfg.image_trainable == "frozen" and not tcfg.augment:  # the cache's first fill, on the device
        t0 = time.perf_counter()
        device = "cuda" if accelerator == "gpu" else "cpu"
        tower_features(DualEncoder(mcfg, fill_prior=False).to(device), train + val, cache, device,
                       show_progress=False)
        feat_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    res = fit(mcfg, tcfg, train, val, None, cache_dir=cache, accelerator=accelerator, devices=devices,
              progress=False)
    secs = time.perf_counter() - t0
    per_epoch = float(np.mean([h["seconds"] for h in res.history]))
    r5 = held_out_r5(res.model.cpu(), test, cache)
    print(f"  {label} on {accelerator}: {secs:.0f} s, R@5 {r5:.1f}", file=sys.stderr, flush=True)
    return [label, f"{accelerator} x {devices}", feat_s, round(secs, 1), round(per_epoch, 2), len(res.history),
            round(r5, 1)]


def index_rate(images: Path, model: Path, engine: str, device: str) -> float:
    """Images per second embedded by ``build_index`` into a fresh index."""
    from dualsearch.index.build import build_index

    out = Path(tempfile.mkdtemp(prefix="gpu-index-"))
    try:
        r = build_index(images, model, out, engine=engine, device=device, progress=False)
        return r.added / r.embed_seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def onnx_rate(model_path: Path, gpu: bool, size: int, batch: int = 64, seconds: float = 5.0) -> tuple[float, str]:
    """(images per second, provider used) of the image encoder's ONNX export at batch ``batch``."""
    from dualsearch.encode.cache import default_cache_dir
    from dualsearch.encode.runtime import onnx_file, ort_session
    from dualsearch.model.folder import model_content_hash

    # the image encoder's export that indexing wrote and verified (bench/index_speed.py's encoder_of)
    session = ort_session(onnx_file(default_cache_dir(), f"encoder-{model_content_hash(model_path)}"), gpu=gpu)
    return session_rate(session, size, batch, seconds), session.get_providers()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="generated training images")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the trainable-tower rows")
    ap.add_argument("--index-images", type=int, default=2000)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: every step on the CPU at toy sizes")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    import torch

    from dualsearch.data.split import split_records
    from dualsearch.logs import quiet_libraries

    quiet_libraries()
    gpus = torch.cuda.device_count()
    if not gpus and not args.dry_run:
        sys.exit("bench/gpu.py: no CUDA device here (torch.cuda.device_count() == 0); nothing measured "
                 "(--dry-run runs the steps on the CPU)")
    acc = "cpu" if args.dry_run else "gpu"
    if args.dry_run:
        args.images, args.epochs, args.index_images = min(args.images, 120), 1, min(args.index_images, 40)
    name = "cuda: " + torch.cuda.get_device_name(0) if gpus and not args.dry_run else "dry run on the CPU"
    print(f"# bench/gpu.py on {machine()}; {name}, {gpus} device(s)")
    data = shapes("shapes", args.images, seed=1)
    p = split_records(data.records, {"train": 0.9, "val": 0.1}, seed=0)
    parts = (p["train"], p["val"], shapes("shapes", 500 if not args.dry_run else 40, seed=2).records)
    cache = tempfile.mkdtemp(prefix="gpu-cache-", dir=BENCH_DIR)
    rows = [train_row("default recipe (frozen towers, cached features)", parts, acc, 1, cache),
            train_row("image tower trainable (all), --augment", parts, acc, 1, cache, image_trainable="all",
                      augment=True, epochs=args.epochs)]
    if gpus >= 2 and not args.dry_run:
        rows.append(train_row(f"image tower trainable (all), --augment, DDP x {gpus}", parts, acc, gpus, cache,
                              image_trainable="all", augment=True, epochs=args.epochs))
    from dualsearch.model.dual_encoder import DualEncoder
    from dualsearch.train.fit import fit, recipe

    mcfg, tcfg = recipe("default", epochs=1)
    model_dir = Path(cache) / "model"
    fit(mcfg, tcfg, parts[0][:200], parts[1][:20], model_dir, cache_dir=cache, accelerator=acc, progress=False)
    folder = shapes("index-gpu", args.index_images, seed=9, size="640x480")
    images = Path(folder.records[0].image.path).parent
    speed = [["index, ONNX Runtime on the CPU (default engine)", f"{index_rate(images, model_dir, 'auto', 'cpu'):.0f}"],
             [f"index, --engine torch --device {'cpu' if args.dry_run else 'cuda'}",
              f"{index_rate(images, model_dir, 'torch', 'cpu' if args.dry_run else 'cuda'):.0f}"]]
    size = DualEncoder(mcfg, fill_prior=False).image_tower.image_size
    for gpu in (False, True):
        try:
            rate, provider = onnx_rate(model_dir, gpu and not args.dry_run, size)
            speed.append([f"image encoder, ONNX Runtime {provider}, batch 64", f"{rate:.0f}"])
        except Exception as e:  # noqa: BLE001 - a missing provider or export is a row, not a crash
            speed.append([f"image encoder, ONNX Runtime ({'CUDA' if gpu else 'CPU'})", f"not run: {e}"[:120]])
    print(table(["training", "device", "features s", "train s", "s/epoch", "epochs", "held-out t2i R@5"], rows))
    print()
    print(table(["embedding", "images/s"], speed))
    if args.json:
        Path(args.json).write_text(json.dumps({"training": rows, "embedding": speed}, indent=1))
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
