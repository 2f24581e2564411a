"""`dualsearch demo`: the whole path on generated data, offline, in a few minutes on 2 CPU cores.

generate shapes -> train the default recipe -> evaluate on held-out images -> index them ->
run example queries -> loss plot, result grids and the evaluation table in one folder.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .storage import write_text

log = logging.getLogger(__name__)

QUERIES = (
    "two red triangles",
    "a large blue circle on the left",
    "a yellow star above a green square",
    "three shapes on a dark background",
    "a small white hexagon on a pink background",
)


def _train(out: Path, records, epochs: int | None, cache: Path, step):
    from .data.split import split_records
    from .train.fit import fit, recipe

    step("training the default recipe (tower features are computed once, then cached)")
    mcfg, tcfg = recipe("default", epochs=epochs)
    parts = split_records(records, {"train": 0.9, "val": 0.1}, seed=0)
    res = fit(mcfg, tcfg, parts["train"], parts["val"], out / "model", cache_dir=cache, progress=False)
    step(f"trained {len(res.history)} epochs; loss curve: {out / 'model' / 'loss.png'}")
    return out / "model", res.model


def _evaluate(out: Path, model, records, cache: Path, step) -> None:
    from .encode.features import embed_records
    from .eval import retrieval_metrics

    step("evaluating on held-out images")
    emb = embed_records(model, records, cache, show_progress=False)
    metrics = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image, k=100)
    write_text(out / "eval.txt", metrics.table() + "\n")
    write_text(out / "eval.json", json.dumps(metrics.as_dict(), indent=2))
    print(metrics.table())


def _index_and_query(out: Path, model_dir: Path, step) -> None:
    from .index.build import build_index
    from .search import Searcher, save_grid

    step("indexing the held-out images")
    report = build_index(out / "data" / "held-out" / "images", model_dir, out / "index", progress=False)
    step(report.summary())
    searcher = Searcher.open(out / "index")
    lines = []
    try:
        for i, q in enumerate(QUERIES, 1):
            results = searcher.search(q, k=9)
            grid = save_grid(results, out / "grids" / f"query{i}.png", title=q)
            lines.append(f"{q!r}: top score {results[0].score:.3f} -> {grid}")
            step(lines[-1])
    finally:
        searcher.close()
    write_text(out / "queries.txt", "\n".join(lines) + "\n")


def run_demo(out: str | Path = "demo-out", images: int = 1200, epochs: int | None = None,
             model: str | None = None, held_out: int = 300) -> Path:
    """generate -> train (or load ``model``) -> evaluate -> index -> query, all under ``out``."""
    from .data.readers import read_dataset
    from .data.shapes import generate_shapes
    from .model.dual_encoder import DualEncoder

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step(f"generating {images} training and {held_out} held-out images")
    train_caps = generate_shapes(out / "data" / "train", images, seed=0, progress=False)
    test_caps = generate_shapes(out / "data" / "held-out", held_out, seed=1, progress=False)
    if model is None:
        model_dir, dual = _train(out, read_dataset(train_caps, out / "data" / "train").records, epochs, cache, step)
    else:
        model_dir, dual = Path(model), DualEncoder.load(model)
    _evaluate(out, dual, read_dataset(test_caps, out / "data" / "held-out").records, cache, step)
    _index_and_query(out, model_dir, step)
    step(f"done. Everything is in {out}/: model/loss.png, eval.txt, grids/*.png, index/")
    print(f"\nsearch it yourself:\n  dualsearch search {out / 'index'} \"a green circle above a red square\" "
          f"--grid /tmp/grid.png\nserve the search page (http://127.0.0.1:8765/):\n"
          f"  dualsearch serve {out / 'index'}")
    return out
