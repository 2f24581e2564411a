"""Seconds per epoch of the seed recipe: recomputing the frozen towers every epoch (as the reference
does) against the cached-feature path, on the same generated data, with the loss curves compared.

    python bench/train_speed.py [--images 500] [--epochs 3]

Both runs use the same seed, batches and recipe; the cached path computes tower features once
(reported separately, and reused by later runs) and then trains only the heads.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, shapes, table  # noqa: E402
from dualsearch.data.split import split_records  # noqa: E402
from dualsearch.logs import quiet_libraries  # noqa: E402
from dualsearch.train.fit import fit, recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()

    ds = shapes("speed", args.images, seed=5)
    parts = split_records(ds.records, {"train": 0.9, "val": 0.1}, seed=0)
    mcfg, tcfg = recipe("seed", epochs=args.epochs, early_stop_patience=100)
    pairs = sum(min(2, len(r.captions)) for r in parts["train"])

    raw = fit(mcfg, tcfg, parts["train"], parts["val"], None, use_cache=False, progress=False)
    cache = BENCH_DIR / "speed-cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    cached = fit(mcfg, tcfg, parts["train"], parts["val"], None, cache_dir=cache, progress=False)
    first_run = time.perf_counter() - t0 - sum(r["seconds"] for r in cached.history)
    t0 = time.perf_counter()
    again = fit(mcfg, tcfg, parts["train"], parts["val"], None, cache_dir=cache, progress=False)
    warm_setup = time.perf_counter() - t0 - sum(r["seconds"] for r in again.history)

    raw_epoch = sum(r["seconds"] for r in raw.history) / len(raw.history)
    cached_epoch = sum(r["seconds"] for r in cached.history) / len(cached.history)
    rows = [["raw: towers every epoch (reference)", len(raw.history), round(raw_epoch, 2), "-", 1.0],
            ["cached features, first run", len(cached.history), round(cached_epoch, 4), round(first_run, 1),
             round(raw_epoch / cached_epoch, 1)],
            ["cached features, cache warm", len(again.history),
             round(sum(r["seconds"] for r in again.history) / len(again.history), 4), round(warm_setup, 1),
             round(raw_epoch / (sum(r["seconds"] for r in again.history) / len(again.history)), 1)]]
    print(f"\nbench/train_speed.py: seed recipe, {len(parts['train'])} images x 2 captions = {pairs} pairs a "
          f"epoch, batch {tcfg.batch_size}; {machine()}")
    print(table(["path", "epochs", "s / epoch", "setup s (features)", "speed-up"], rows))
    print("\nloss curves (train / val) per epoch:")
    curve = []
    for a, b in zip(raw.history, cached.history):
        curve.append([a["epoch"], round(a["train_loss"], 5), round(b["train_loss"], 5), round(a["val_loss"], 5),
                      round(b["val_loss"], 5), f"{abs(a['val_loss'] - b['val_loss']):.2e}"])
    print(table(["epoch", "train raw", "train cached", "val raw", "val cached", "|val diff|"], curve))
    print(f"target: cached epoch >= 50x faster: {raw_epoch / cached_epoch:.0f}x")


if __name__ == "__main__":
    main()
