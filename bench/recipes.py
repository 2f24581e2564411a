"""The measurements behind the default recipe: variants of it against the seed recipe.

    python bench/recipes.py [--test-images 2000]

Same data as bench/quality.py (3,000 generated training images, 10 % for validation; held-out
images from another seed), frozen EfficientNet-Lite0 + MiniLM features from the shared cache;
each row changes one thing from the default recipe.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import BENCH_DIR, machine, shapes, table  # noqa: E402
from dualsearch.data.split import split_records  # noqa: E402
from dualsearch.encode.features import embed_records  # noqa: E402
from dualsearch.eval import retrieval_metrics  # noqa: E402
from dualsearch.logs import quiet_libraries  # noqa: E402
from dualsearch.train.fit import fit, recipe  # noqa: E402

VARIANTS = [
    ("seed recipe", "seed", {}),
    ("default", "default", {}),
    ("default, 1 head layer", "default", {"head_layers": 1}),
    ("default, 3 head layers", "default", {"head_layers": 3}),
    ("default, embed 512", "default", {"embed_dim": 512}),
    ("default, weight decay 1e-3", "default", {"weight_decay": 1e-3}),
    ("default, lr 3e-3", "default", {"lr": 3e-3}),
    ("default, every pair each epoch", "default", {"pairs": "all"}),
    ("default, SigLIP loss", "default", {"loss": "siglip", "temperature": 0.1}),
    ("default, no dropout", "default", {"dropout": 0.0}),
    ("default, up to 200 epochs", "default", {"epochs": 200, "early_stop_patience": 10}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-images", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    train = shapes("shapes", 3000, seed=1)
    test = shapes("shapes", args.test_images, seed=2)
    parts = split_records(train.records, {"train": 0.9, "val": 0.1}, seed=0)
    cache = BENCH_DIR / "cache"
    rows = []
    for label, name, overrides in VARIANTS:
        mcfg, tcfg = recipe(name, **overrides)
        t0 = time.perf_counter()
        res = fit(mcfg, tcfg, parts["train"], parts["val"], None, cache_dir=cache, progress=False)
        secs = time.perf_counter() - t0
        emb = embed_records(res.model, test.records, cache)
        t2i = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image).text_to_image
        rows.append([label, len(res.history), round(secs, 1), round(t2i["R@1"], 1), round(t2i["R@5"], 1),
                     round(t2i["R@10"], 1)])
        print(rows[-1], flush=True)
    print(f"\nbench/recipes.py: held-out text->image recall on {len(test)} images; {machine()}")
    print(table(["variant", "epochs", "train s", "R@1", "R@5", "R@10"], rows))


if __name__ == "__main__":
    main()
