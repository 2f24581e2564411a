"""``dualsearch duplicates``: near-identical images of an index (resized, re-encoded, cropped copies)."""
from __future__ import annotations

import argparse
import json
import logging

from .common import check_readable, check_writable, open_searcher
from .options import cosine

log = logging.getLogger(__name__)

# dualsearch.index.duplicates.DEFAULT_THRESHOLD, without importing FAISS to build the parser
# (tests/test_duplicates.py holds the two equal)
DEFAULT_THRESHOLD = 0.85


def cmd_duplicates(args: argparse.Namespace) -> None:
    from ..index.duplicates import find_duplicates

    check_readable(args.index, "folder")
    if args.grid:
        check_writable(args.grid)
    threshold = args.threshold
    searcher = open_searcher(args.index)
    try:
        ids, vectors = searcher.catalog.vectors(searcher.dim)
        groups = find_duplicates(searcher.index, ids, vectors, threshold)
        paths = searcher.catalog.paths_for([i for g in groups for i in g])
    finally:
        searcher.close()
    scored = _scored(ids, vectors, groups)
    paths = {i: paths.get(i, f"(id {i}: no longer in the catalog)") for g in groups for i in g}
    if args.json:
        print(json.dumps({"threshold": threshold, "images": len(ids), "groups": [
            {"count": len(g), "ids": [i for i, _ in g], "paths": [paths[i] for i, _ in g],
             "cosine": [round(c, 6) for _, c in g]} for g in scored]}))
    else:
        for n, g in enumerate(scored, 1):
            print(f"group {n}: {len(g)} images")
            for i, c in g:
                print(f"  {c:7.4f}  {paths[i]}")
            print()
    log.info("%d groups of near-duplicates (%d images) among %d, cosine >= %g", len(groups),
             sum(map(len, groups)), len(ids), threshold)
    if args.grid:
        write_grids(scored, paths, args.grid)


def _scored(ids, vectors, groups: list[list[int]]) -> list[list[tuple[int, float]]]:
    """Each group's members with their cosine to its first member (how close each copy is)."""
    import numpy as np

    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    out = []
    for g in groups:
        rows = vectors[order[np.searchsorted(sorted_ids, g)]]
        out.append([(i, float(c)) for i, c in zip(g, rows @ rows[0])])
    return out


def write_grids(scored: list[list[tuple[int, float]]], paths: dict[int, str], folder: str) -> None:
    """One image grid per group, ``FOLDER/group-0001.png``, each cell titled with its cosine to the
    group's first image."""
    from pathlib import Path

    from ..search import Result, save_grid

    for n, g in enumerate(scored, 1):
        results = [Result(paths[i], c, i) for i, c in g]
        save_grid(results, Path(folder) / f"group-{n:04d}.png", title=f"group {n}: {len(g)} near-duplicates",
                  cols=min(4, len(g)))


def register(sub) -> None:
    p = sub.add_parser("duplicates", help="list groups of near-identical images (resized, re-encoded, cropped "
                                          "copies) in an index")
    p.add_argument("index", help="index folder")
    p.add_argument("--threshold", type=cosine, default=DEFAULT_THRESHOLD, metavar="COSINE",
                   help="images whose embeddings have at least this cosine are copies (measured on "
                        "generated copies: see dualsearch.index.duplicates)")
    p.add_argument("--json", action="store_true",
                   help='print {"threshold": .., "groups": [{"count", "ids", "paths", "cosine"}, ...]}')
    p.add_argument("--grid", metavar="DIR", help="write one image grid per group into this folder")
    p.set_defaults(func=cmd_duplicates)
