"""``dualsearch search``, ``serve`` and ``demo``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UsageError
from .common import check_readable, check_writable, open_searcher
from .options import finite_float, iso_date, non_negative_int, port, positive_int

SORTS = ("score", "date")  # dualsearch.search.SORTS (kept light: the parser must not import faiss)


def photo_filter(args: argparse.Namespace):
    """The search filter the command line asks for (None for none)."""
    from ..index.catalog import PhotoFilter

    where = PhotoFilter(folders=tuple(args.folder or ()), globs=tuple(args.glob or ()), after=args.after,
                        before=args.before, cameras=tuple(args.camera or ()), formats=tuple(args.format or ()),
                        min_width=args.min_width, min_height=args.min_height)
    return where or None


def cmd_search(args: argparse.Namespace) -> None:
    from ..search import save_grid

    if not args.query and not args.image and not args.add and args.sort != "date":
        raise UsageError("give a text query, --image PATH, or both (or --sort date alone: newest first)")
    if args.image:
        check_readable(args.image)
    grid = grid_path(args.grid) if args.grid else None
    searcher = open_searcher(args.index, args.model)
    try:
        where = photo_filter(args)
        page = searcher.search_page(args.query, k=args.k, image=args.image, image_weight=args.image_weight,
                                    add=args.add or (), subtract=args.subtract or (), where=where,
                                    offset=args.offset, sort=args.sort, collapse=args.collapse_duplicates,
                                    qbnorm=not args.no_qbnorm)
        empty = (f"no indexed image passes the filters (the index holds {len(searcher)} images below "
                 f"{searcher.catalog.root or 'their own paths'})") if where and not page.total else None
    finally:
        searcher.close()
    print_results(page, args)
    if empty:
        print(empty, file=sys.stderr)
    if grid:
        save_grid(page.results, grid, title=args.query or "")
        print(f"grid written to {grid}", file=sys.stderr if args.json or args.paths else sys.stdout)


def print_results(page, args: argparse.Namespace) -> None:
    """``--paths``: one path per line; ``--json``: a list of hits; else a table, weak matches
    marked, and which slice of how many results it is."""
    results = page.results
    if args.paths:  # the file system's own bytes, so that a name that is not UTF-8 reaches xargs intact
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(os.fsencode(r.path) + b"\n" for r in results))
        sys.stdout.buffer.flush()
    elif args.json:
        print(json.dumps([{"path": r.path, "score": round(r.score, 6), "id": r.id, "weak": r.weak, "z": r.z,
                           "duplicates": r.duplicates, **r.meta} for r in results]))
    else:
        print(f"{'rank':>4}  {'score':>7}  {'match':<5}  {'taken':<10}  path")
        for i, r in enumerate(results, page.offset + 1):
            match = "weak" if r.weak else ("" if r.weak is None else "good")
            taken = (r.meta.get("taken") or "")[:10]
            copies = f"  (+{r.duplicates - 1} near-duplicate{'s' if r.duplicates > 2 else ''})" \
                if r.duplicates > 1 else ""
            score = f"{r.score:7.4f}" if page.ranked else f"{'-':>7}"
            print(f"{i:>4}  {score}  {match:<5}  {taken:<10}  {r.path}{copies}")
        shown = f"{page.offset + 1}-{page.offset + len(results)}" if results else "none"
        print(f"results {shown} of {page.total}" + ("; 'weak': no better than the best match of an unrelated "
                                                    "query on this index" if any(r.weak for r in results) else ""),
              file=sys.stderr)


def add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combined with the query; results are the top k among the images that pass)")
    g.add_argument("--in", dest="folder", action="append", metavar="FOLDER",
                   help="only images below this folder of the indexed root (repeatable: any of them)")
    g.add_argument("--glob", action="append", metavar="PATTERN",
                   help="only paths matching this shell pattern (a name like '*.png', or a path with '/' relative "
                        "to the root; repeatable)")
    g.add_argument("--after", type=iso_date, metavar="DATE", help="taken on or after this date (YYYY-MM-DD)")
    g.add_argument("--before", type=iso_date, metavar="DATE", help="taken before this date (YYYY-MM-DD)")
    g.add_argument("--camera", action="append", metavar="TEXT", help="camera make or model contains TEXT (repeatable)")
    g.add_argument("--format", action="append", metavar="FMT", help="image format: jpeg, png, heic, ... (repeatable)")
    g.add_argument("--min-width", type=positive_int, metavar="PX", help="at least this many pixels wide")
    g.add_argument("--min-height", type=positive_int, metavar="PX", help="at least this many pixels high")


GRID_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")


def grid_path(text: str) -> str:
    """Where ``--grid`` writes: ".png" added when the name has no image suffix; a missing parent
    folder is created and said; an unwritable place is a one-line error before searching."""
    path = Path(text)
    if path.suffix.lower() not in GRID_FORMATS:
        path = path.with_name(path.name + ".png")
    check_writable(path, folder=False)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        print(f"created folder {path.parent}", file=sys.stderr)
    return str(path)


def cmd_serve(args: argparse.Namespace) -> None:
    from ..server.app import serve

    open_searcher(args.index).close()  # a clear error before the server starts
    serve(args.index, host=args.host, port=args.port, cors_origins=args.cors_origin, max_k=args.max_k)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(args.out, images=args.images, epochs=args.epochs, model=args.model)


def register(sub) -> None:
    p = sub.add_parser("search", help="search an index with text, an image, or both")
    p.add_argument("index", help="index folder")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("-k", "--limit", dest="k", type=positive_int, default=9, help="number of results (one page)")
    p.add_argument("--offset", type=non_negative_int, default=0, help="skip this many results (the next pages)")
    p.add_argument("--sort", choices=SORTS, default="score",
                   help="score: best first; date: the good matches (not weak), newest first")
    p.add_argument("--image", metavar="PATH", help="query image (more like this)")
    p.add_argument("--image-weight", type=finite_float, default=1.0, help="weight of --image against the text")
    p.add_argument("--add", action="append", metavar="TEXT", help="extra text to pull results toward")
    p.add_argument("--subtract", action="append", metavar="TEXT", help="text to push results away from")
    p.add_argument("--model", help="model folder (default: the one recorded in the index)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help='print [{"path": .., "score": .., "id": .., "weak": .., "taken": .., ...}, ...]')
    out.add_argument("--paths", action="store_true", help="print the paths only, one per line (for xargs)")
    p.add_argument("--grid", metavar="PNG", help="write a grid image of the results")
    p.add_argument("--collapse-duplicates", action="store_true",
                   help="show one image per group of near-identical copies, with how many it stands for")
    p.add_argument("--no-qbnorm", action="store_true",
                   help="rank by cosine alone, without the index's hubness correction (QB-Norm)")
    add_filter_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve an index as a search page and JSON API")
    p.add_argument("index", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8765, help="TCP port")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow this origin (repeatable)")
    p.add_argument("--max-k", type=positive_int, default=100, help="largest k a request may ask for")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="generate data, train, evaluate, index and search: the whole path")
    p.add_argument("--out", default="demo-out", help="folder for the data, model, index and grids")
    p.add_argument("--images", type=positive_int, default=1200, help="generated training images")
    p.add_argument("--epochs", type=positive_int, default=None, help="cap the training epochs")
    p.add_argument("--model", help="use this model folder instead of training one")
    p.set_defaults(func=cmd_demo)
