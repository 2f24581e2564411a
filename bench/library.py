"""The photo library's two measured claims (#14):

1. **Weak-match floor** on the shapes held-out set: a gallery of held-out images with every image
   whose captions mention one colour removed; queries about that colour have no matching image.
   How often is the top result of such a query marked weak (want: often), and how often is a
   true match (a gallery image's own caption, its image in the top 1) marked weak (want: rarely)?
2. **Metadata pass cost**: indexing 2,000 generated 640x480 JPEGs with EXIF; the metadata pass
   (headers only) against the whole indexing run, in the same run. Target: under 10 %.

    python bench/library.py [--train-images 1200] [--test-images 2000] [--color purple]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, shapes, table  # noqa: E402
from dualsearch.data.split import split_records  # noqa: E402
from dualsearch.index.build import build_index  # noqa: E402
from dualsearch.index.catalog import Catalog  # noqa: E402
from dualsearch.index.photos import fill_metadata  # noqa: E402
from dualsearch.logs import quiet_libraries  # noqa: E402
from dualsearch.search import Searcher  # noqa: E402
from dualsearch.train.fit import fit, recipe  # noqa: E402


def trained_model(train_images: int, cache: str) -> Path:
    out = BENCH_DIR / f"library-model-{train_images}"
    if not (out / "config.json").is_file():
        ds = shapes("shapes", train_images, seed=1)
        parts = split_records(ds.records, {"train": 0.9, "val": 0.1}, seed=0)
        mcfg, tcfg = recipe("default")
        fit(mcfg, tcfg, parts["train"], parts["val"], out, cache_dir=cache, progress=False)
    return out


def gallery(test, color: str) -> tuple[Path, list[str], list[tuple[str, str]]]:
    """(folder of the held-out images with no caption mentioning ``color``, the captions of the
    removed ones (no match), (caption, file name) of the kept ones (a true match))."""
    folder = BENCH_DIR / f"library-gallery-{len(test.records)}-{color}"
    removed, kept = [], []
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for r in test.records:
        path, caps = r.image.path, r.captions
        if any(color in c.split() for c in caps):
            removed.append(caps[0])
        else:
            (folder / Path(path).name).symlink_to(Path(path).resolve())
            kept.append((caps[0], Path(path).name))
    return folder, removed, kept


def weak_rates(index: Path, removed: list[str], kept: list[tuple[str, str]], n: int) -> list[list]:
    s = Searcher.open(index)
    try:
        no_match = [s.search(q, k=1)[0] for q in removed[:n]]
        rows = [["no matching image (top 1 marked weak)", len(no_match),
                 round(100 * np.mean([r.weak for r in no_match]), 1)]]
        top1 = [(s.search(q, k=1)[0], name) for q, name in kept[:n]]
        hits = [r for r, name in top1 if Path(r.path).name == name]
        rows.append(["true match at rank 1 (marked weak)", len(hits), round(100 * np.mean([r.weak for r in hits]), 1)])
        rows.append(["any top 1 of a matching query (marked weak)", len(top1),
                     round(100 * np.mean([r.weak for r, _ in top1]), 1)])
        return rows
    finally:
        s.close()


def exif_photos(test, count: int) -> Path:
    folder = BENCH_DIR / f"library-exif-{count}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(test.records[:count]):
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = "Canon", "EOS R6"
        exif.get_ifd(0x8769)[0x9003] = f"2024:{1 + i % 12:02d}:{1 + i % 28:02d} 12:00:00"
        img = Image.open(r.image.path).convert("RGB").resize((640, 480))
        img.save(folder / f"IMG_{i:05d}.jpg", exif=exif, quality=88)
    return folder


def metadata_cost(model: Path, folder: Path) -> list[list]:
    out = BENCH_DIR / "library-exif-index"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = build_index(folder, model, out, kind="flat", progress=False)
    total = time.perf_counter() - t0
    cat = Catalog(out)
    with cat.transaction():
        cat.db.execute("UPDATE files SET metadata_version = NULL")  # read them all again, timed alone
    t0 = time.perf_counter()
    n = fill_metadata(cat, show_progress=False)
    meta = time.perf_counter() - t0
    cat.close()
    return [["index run (embedding + metadata + ANN)", report.added, round(total, 2), round(report.added / total, 1),
             100.0],
            ["metadata pass alone", n, round(meta, 2), round(n / meta, 1), round(100 * meta / total, 2)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=1200)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--color", default="purple")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--exif-images", type=int, default=2000)
    ap.add_argument("--cache-dir", default=str(BENCH_DIR / "cache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    model = trained_model(args.train_images, args.cache_dir)
    test = shapes("shapes", args.test_images, seed=2)
    folder, removed, kept = gallery(test, args.color)
    index = BENCH_DIR / f"library-index-{args.color}"
    shutil.rmtree(index, ignore_errors=True)
    build_index(folder, model, index, kind="flat", progress=False)
    print(f"\nbench/library.py on {machine()}")
    print(f"weak-match floor: shapes held-out gallery of {len(kept)} images (every image whose captions mention "
          f"'{args.color}' removed), model trained with the default recipe on {args.train_images} images")
    print(table(["queries", "n", "% marked weak"], weak_rates(index, removed, kept, args.queries)))
    print(f"\nmetadata pass: {args.exif_images} generated 640x480 JPEGs with EXIF (target: < 10 % of indexing)")
    print(table(["step", "images", "seconds", "img/s", "% of index run"],
                metadata_cost(model, exif_photos(test, args.exif_images))))


if __name__ == "__main__":
    main()
